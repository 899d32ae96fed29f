"""The batched forward pass: mixed prefill/decode chunks of several sequences in one call."""

import pytest
import torch

from shared.engine.batch import ForwardBatch, SequenceChunk
from shared.engine.kv_cache import PagedKVCache
from shared.engine.loader import load_model

BLOCK = 4


def run(loaded, cache, chunks, input_ids):
    batch = ForwardBatch.build(chunks, BLOCK)
    with torch.inference_mode():
        return loaded.model(torch.tensor(input_ids), batch, cache)


def alone(loaded, ids):
    cache = PagedKVCache(loaded.config, 8, BLOCK)
    return run(loaded, cache, [SequenceChunk(list(range(8)), 0, len(ids))], ids)[0]


@pytest.fixture(params=["tiny-llama", "tiny-qwen3", "tiny-moe"])
def tiny_family(request, tiny):
    return tiny if request.param == "tiny-llama" else load_model(request.param)


def test_mixed_batch_equals_sequences_alone(tiny_family):
    tiny = tiny_family
    a = [1, 520, 9531, 198, 77, 4093, 11, 28, 3060, 99, 1001, 42, 7, 8, 9]
    b = [1, 4093, 198, 6004, 2, 11, 12, 13, 14]
    c = [77]
    cache = PagedKVCache(tiny.config, 16, BLOCK)
    table_a, table_b, table_c = [9, 3, 12, 0], [5, 15, 1], [7]  # scattered pages
    run(tiny, cache, [SequenceChunk(table_a, 0, 10)], a[:10])  # a's prompt, first chunk
    # One pass: a continues (chunked prefill), b prefills, c prefills a single token.
    logits = run(
        tiny, cache,
        [SequenceChunk(table_a, 10, 5), SequenceChunk(table_b, 0, 9), SequenceChunk(table_c, 0, 1)],
        a[10:] + b + c,
    )
    assert logits.shape == (3, tiny.config.vocab_size) and logits.dtype == torch.float32
    for row, ids in zip(logits, (a, b, c)):
        torch.testing.assert_close(row, alone(tiny, ids), rtol=1e-5, atol=1e-4)
    # And a decode step for all three, each at its own position.
    logits = run(
        tiny, cache,
        [SequenceChunk(table_a, 15, 1), SequenceChunk(table_b, 9, 1), SequenceChunk(table_c, 1, 1)],
        [5, 6, 7],
    )
    for row, ids in zip(logits, (a + [5], b + [6], c + [7])):
        torch.testing.assert_close(row, alone(tiny, ids), rtol=1e-5, atol=1e-4)


def test_forward_batch_metadata():
    batch = ForwardBatch.build([SequenceChunk([2, 0], 3, 2), SequenceChunk([1], 0, 3)], BLOCK)
    assert batch.positions.tolist() == [3, 4, 0, 1, 2]
    assert batch.slot_mapping.tolist() == [11, 0, 4, 5, 6]
    assert batch.last_token_index.tolist() == [1, 4]
    assert batch.decode is None  # no one-token chunk
    first, second = batch.prefills
    assert (first.start, first.num_new, first.num_cached) == (0, 2, 3)
    assert first.pages.tolist() == [[2, 0]] and second.pages.tolist() == [[1]]
    assert first.mask.tolist() == [[True] * 4 + [False], [True] * 5]
    assert second.start == 2 and second.mask is None  # a fresh prompt: plain causal
    mixed = ForwardBatch.build([SequenceChunk([2, 0], 6, 1), SequenceChunk([1], 0, 3), SequenceChunk([3], 1, 1)], BLOCK)
    assert mixed.decode is not None and mixed.decode.rows.tolist() == [0, 4]  # decodes in one group, wherever they sit
    assert mixed.decode.pages.tolist() == [[2, 0], [3, 3]]  # padded with a real page, masked out
    inf = float("-inf")
    assert mixed.decode.bias[0, :, 0].tolist() == [[0.0] * 7 + [inf], [0.0] * 2 + [inf] * 6]
