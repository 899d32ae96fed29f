"""Our GGUF tokenizer against HF's tokenizer for the same file."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.engine.tokenizer import IncrementalDetokenizer, load_tokenizer
from tests.oracle import hf_tokenizer

TEXTS = [
    "Hello world",
    "12345 and 3.14159, 1,000,000 in 2024",
    "  multiple   spaces\n\n\ttabs  \n ",
    "héllo 日本語 🙂 naïve café Ωμέγα",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say it's fine, don't you think?",
    "text<|endoftext|>more<empty_output>",
    "def f(x):\n    return x ** 2  # square",
    "\u00a0non-breaking\u2003em-space",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke 🙂"},
    ],
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf(tok, text):
    assert tok.encode(text) == hf_tokenizer().encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_hf(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tokenizer().decode(ids, skip_special_tokens=False)
    assert tok.decode(ids) == hf_tokenizer().decode(ids, skip_special_tokens=True)


def test_control_tokens_are_single_ids(tok):
    assert tok.encode("<|im_start|>assistant<|im_end|>") == [1, *tok.encode("assistant"), 2]
    assert tok.eos_token_ids == (2,)
    assert tok.bos_token_id == 1


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer().apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def _stream(tok, ids):
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush()


def test_incremental_detokenizer_concatenates_to_decode(tok):
    ids = tok.encode("héllo 日本語 🙂 naïve<|im_end|> café 🇫🇷!")
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids)
    assert tail == ""
    # Multi-byte characters span several tokens here; no delta may carry half of one.
    assert any(d == "" for d in deltas)
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_flushes_an_incomplete_tail(tok):
    emoji = tok.encode("🙂")
    assert len(emoji) > 1  # the test needs a character split over tokens
    deltas, tail = _stream(tok, emoji[:-1])
    assert deltas == [""] * (len(emoji) - 1)
    assert tail == tok.decode(emoji[:-1]) and tail.endswith("\ufffd")


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_incremental_detokenizer_any_text(tok, text):
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids)


def test_unknown_model_lists_presets():
    with pytest.raises(ValueError) as info:
        load_tokenizer("gpt-17")
    assert "smollm2-135m" in str(info.value) and "tiny-llama" in str(info.value)
