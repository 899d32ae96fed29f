"""Text <-> token ids and the chat template, built from a GGUF's metadata.

Mirrors what HF transformers builds for a GGUF with `tokenizer.ggml.model == "gpt2"`:
byte-level BPE from the file's tokens and merges, GPT-2's pre-tokenizer regex (no
per-`tokenizer.ggml.pre` split for "smollm"), control tokens (token_type 3) as special
tokens matched whole in text, user-defined tokens (type 4) as plain added tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from shared.engine.gguf_file import GgufFile
from shared.engine.presets import get_preset

_CONTROL = 3
_USER_DEFINED = 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE tokens are spelled in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _byte_level_vocab(tokens: Sequence[str]) -> dict[str, int]:
    """Token -> id; a token not spelled in the byte alphabet is respelled from its UTF-8 bytes (as HF does)."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    return vocab


def _build_byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int]) -> Tokenizer:
    bpe = models.BPE(vocab=_byte_level_vocab(tokens), merges=[tuple(m.split(" ")) for m in merges])
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = set(_bytes_to_unicode().values())
    # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel; HF skips it too.
    control = [t for t, kind in zip(tokens, token_types) if kind == _CONTROL and set(t) <= alphabet]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tokenizer


def _compile_chat_template(source: str) -> jinja2.Template:
    """Sandboxed like HF's `apply_chat_template`: same whitespace control, filters and globals."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters, which templates do not expect.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTokenizer:
    """Encodes, decodes and renders chat prompts. Safe to share between threads (read-only)."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str, bos_token_id: int, eos_token_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self._template = _compile_chat_template(chat_template)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self._special_tokens = {
            "bos_token": tokenizer.id_to_token(bos_token_id),
            "eos_token": tokenizer.id_to_token(self.eos_token_ids[0]),
        }

    @classmethod
    def from_gguf(cls, gguf: GgufFile) -> ChatTokenizer:
        kind = gguf.field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{gguf.path.name}: tokenizer model {kind!r} is not supported (only byte-level 'gpt2')")
        tokens = gguf.field("tokenizer.ggml.tokens")
        token_types = gguf.field("tokenizer.ggml.token_type", [1] * len(tokens))
        tokenizer = _build_byte_level_bpe(tokens, gguf.field("tokenizer.ggml.merges"), token_types)
        return cls(
            tokenizer,
            chat_template=gguf.field("tokenizer.chat_template"),
            bos_token_id=gguf.field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(gguf.field("tokenizer.ggml.eos_token_id"),),
        )

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. "<|im_start|>") stay whole. No BOS added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]); encode() it to get ids."""
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._special_tokens
        )


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals decode(all ids).

    A multi-byte character can span tokens; while the decoded tail ends in U+FFFD (an
    incomplete UTF-8 sequence) the text is held back until the next token completes it.
    Decoding restarts from the last emitted boundary (vLLM's prefix/read offsets), so each
    call costs O(tokens since the last emission), not O(all tokens).
    """

    def __init__(self, tokenizer: ChatTokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window re-decoded for context
        self._read_offset = 0  # ids before this were emitted

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip_special)

    def add(self, token_id: int) -> str:
        """Feeds one token; returns the newly completed text (possibly "")."""
        self._ids.append(token_id)
        emitted = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset)
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD); call at the end."""
        emitted = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(emitted):]


def load_tokenizer(model_name: str) -> ChatTokenizer:
    """The tokenizer of a preset, from GGUF metadata only (no weights are read): cheap enough for the gateway."""
    return ChatTokenizer.from_gguf(GgufFile(get_preset(model_name).gguf_path()))
