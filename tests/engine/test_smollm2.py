"""The engine on the real SmolLM2-135M GGUF against HF transformers loading the same file."""

import pytest
import torch

from shared.engine.batch import ForwardBatch, SequenceChunk
from shared.engine.engine import Engine
from shared.engine.kv_cache import PagedKVCache
from shared.engine.sampling import SamplingParams
from tests.oracle import hf_greedy_tokens, hf_last_logits

# float32 on both sides, same dequantized weights (checked bit-equal when this was written);
# what remains is summation order in matmul/attention: observed max |diff| ~5e-5 on logits of
# magnitude ~30. 1e-3 leaves room for other BLAS builds and still catches any real bug.
LOGITS_ATOL = 1e-3

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]


def chat_ids(loaded, text):
    tok = loaded.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def prefill_logits(loaded, prompt_ids, block_size):
    """Last-token logits of one prompt run through the model over a fresh paged cache."""
    num_blocks = -(-len(prompt_ids) // block_size)
    cache = PagedKVCache(loaded.config, num_blocks + 2, block_size)
    # Pages in scrambled order, so page order != slot order.
    table = list(reversed(range(num_blocks + 2)))[:num_blocks]
    batch = ForwardBatch.build([SequenceChunk(table, 0, len(prompt_ids))], block_size)
    with torch.inference_mode():
        return loaded.model(torch.tensor(prompt_ids), batch, cache)[0]


def run_to_end(engine):
    tokens = {}
    while engine.num_running:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token_id)
    return tokens


def test_last_token_logits_match_hf(smollm2):
    ids = chat_ids(smollm2, "Explain in two sentences why the sky is blue.")
    ours = prefill_logits(smollm2, ids, block_size=16)
    theirs = hf_last_logits(ids)
    assert ours.shape == (smollm2.config.vocab_size,)
    assert (ours - theirs).abs().max().item() <= LOGITS_ATOL
    assert ours.argmax() == theirs.argmax()


def test_prompt_crossing_pages_matches_one_page(smollm2):
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)[:37]
    assert len(ids) == 37
    small_pages = prefill_logits(smollm2, ids, block_size=16)  # 3 pages, the last partly filled
    one_page = prefill_logits(smollm2, ids, block_size=64)
    torch.testing.assert_close(small_pages, one_page, rtol=0, atol=1e-5)
    assert (small_pages - hf_last_logits(ids)).abs().max().item() <= LOGITS_ATOL


def test_greedy_batch_matches_hf(smollm2):
    engine = Engine(smollm2, kv_cache_tokens=1024, block_size=16)
    prompts = {f"r{i}": chat_ids(smollm2, text) for i, text in enumerate(PROMPTS)}
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    first = {rid: engine.prefill(rid, ids, greedy) for rid, ids in prompts.items()}
    rest = run_to_end(engine)  # all three decode together in each step
    for rid, ids in prompts.items():
        ours = [first[rid].token_id, *rest.get(rid, [])]
        assert ours == hf_greedy_tokens(ids, max_new_tokens=32), smollm2.tokenizer.decode(ours)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0.0, max_tokens=24),
        SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24),
    ],
    ids=["greedy", "seeded"],
)
def test_disaggregated_equals_colocated(smollm2, sampling):
    ids = chat_ids(smollm2, "Tell me a short story about a robot.")
    colocated = Engine(smollm2, kv_cache_tokens=256)
    first = colocated.prefill("a", ids, sampling)
    expected = [first.token_id, *run_to_end(colocated)["a"]]

    prefill = Engine(smollm2, kv_cache_tokens=256, block_size=16)
    decode = Engine(smollm2, kv_cache_tokens=256, block_size=32)  # another page size on purpose
    first = prefill.prefill("a", ids, sampling)
    kv = prefill.export_kv("a")
    prefill.free("a")
    assert kv.shape == (30, 2, len(ids), 3, 64) and kv.is_contiguous()
    decode.add_prefilled("a", ids, first.token_id, kv, sampling)
    got = [first.token_id, *run_to_end(decode)["a"]]
    assert got == expected
    assert len(got) == 24 or got[-1] == 2
