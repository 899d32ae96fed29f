"""The engine on SmolLM2's GGUF blocks (Q4_1 linears, Q8_0 tied head) against the same engine on dense float32 weights."""

import dataclasses

import pytest
import torch

from shared.engine.batch import ForwardBatch, SequenceChunk
from shared.engine.block_matmul import default_kernel
from shared.engine.engine import Engine
from shared.engine.kv_cache import PagedKVCache
from shared.engine.loader import linear_weight_names, load_model
from shared.engine.prepack import BLOCK_PATH_MAX_ROWS, BlockLinear, PackedLinear, prepacked, uses_block_weights
from shared.engine.sampling import SamplingParams
from tests.engine.test_smollm2 import PROMPTS, chat_ids, run_to_end

needs_kernel = pytest.mark.skipif(default_kernel() is None, reason="block kernel unavailable (no AVX2 or no compiler)")

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def greedy_tokens(engine: Engine, prompts: dict[str, list[int]], together: bool) -> dict[str, list[int]]:
    """Greedy tokens per request: all decoding in one batch, or each request alone."""
    if together:
        first = {rid: engine.prefill(rid, ids, GREEDY).token_id for rid, ids in prompts.items()}
        rest = run_to_end(engine)
        tokens = {rid: [first[rid], *rest.get(rid, [])] for rid in prompts}
    else:
        tokens = {}
        for rid, ids in prompts.items():
            tokens[rid] = [engine.prefill(rid, ids, GREEDY).token_id, *run_to_end(engine).get(rid, [])]
    for rid in prompts:
        engine.free(rid)
    return tokens


class CountingModule(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.inner(x)


def dense_engine(loaded) -> Engine:
    return Engine(dataclasses.replace(loaded, block_weights={}), kv_cache_tokens=2048)


def test_every_linear_has_blocks_equal_to_its_dense_weights(smollm2):
    names = linear_weight_names(smollm2.config)
    assert len(names) == 30 * 7 + 1 and names[-1] == "embed_tokens.weight"  # the tied LM head
    assert sorted(smollm2.block_weights) == sorted(names)
    formats = {name: weight.format.name for name, weight in smollm2.block_weights.items()}
    assert formats["embed_tokens.weight"] == "Q8_0" and formats["layers.0.attn.q_proj.weight"] == "Q4_1"
    dense = smollm2.model.state_dict()
    # every row, bit for bit (the loader checks a sample); q/k rows included, so the un-permutation matches too
    assert [name for name, weight in smollm2.block_weights.items() if not weight.matches(dense[name])] == []


def test_bfloat16_models_keep_no_blocks():
    assert load_model("smollm2-135m", dtype=torch.bfloat16).block_weights == {}


@needs_kernel
def test_engine_twin_uses_blocks_with_the_dense_path_kept(smollm2):
    engine = Engine(smollm2, kv_cache_tokens=256)
    twin = engine.model
    assert uses_block_weights(twin) and twin is not smollm2.model
    attn, mlp = twin.layers["0"].attn, twin.layers["0"].mlp
    assert isinstance(attn.qkv_proj, BlockLinear) and attn.qkv_proj.weight_blocks.out_features == 576 + 2 * 192
    assert isinstance(mlp.gate_up_proj, BlockLinear) and isinstance(mlp.down_proj, BlockLinear)
    assert isinstance(twin.lm_head, BlockLinear) and isinstance(twin.lm_head.dense, PackedLinear)
    assert twin.embed_tokens is smollm2.model.embed_tokens  # shared, not copied
    assert smollm2.model.layers["0"].attn.qkv_proj is None  # the loaded model itself is untouched
    dense = dense_engine(smollm2).model
    assert not uses_block_weights(dense) and prepacked(smollm2.model) is dense


@needs_kernel
def test_block_linear_takes_blocks_up_to_max_rows_then_dense(smollm2):
    linear = Engine(smollm2, kv_cache_tokens=256).model.layers["3"].mlp.down_proj
    dense = linear.dense
    linear.dense = counting = CountingModule(dense)
    try:
        x = torch.randn(BLOCK_PATH_MAX_ROWS + 1, 1536)
        small = linear(x[:BLOCK_PATH_MAX_ROWS])
        large = linear(x)
    finally:
        linear.dense = dense
    assert counting.rows == [BLOCK_PATH_MAX_ROWS + 1]
    torch.testing.assert_close(small, large[:BLOCK_PATH_MAX_ROWS], rtol=0, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("together", [False, True], ids=["alone", "batched"])
def test_greedy_tokens_match_the_dense_engine(smollm2, together):
    prompts = {f"r{i}": chat_ids(smollm2, text) for i, text in enumerate(PROMPTS)}
    blocks = greedy_tokens(Engine(smollm2, kv_cache_tokens=2048), prompts, together)
    dense = greedy_tokens(dense_engine(smollm2), prompts, together)
    assert blocks == dense
    assert all(len(tokens) > 5 for tokens in blocks.values())


def decode_logits(model, loaded, prompt_ids: list[int], next_id: int) -> torch.Tensor:
    """Logits after one decode step of `next_id` behind the prompt (the prompt runs as a prefill, dense path)."""
    num_blocks = -(-(len(prompt_ids) + 1) // 16)
    cache, table = PagedKVCache(loaded.config, num_blocks, 16), list(range(num_blocks))
    with torch.inference_mode():
        model(torch.tensor(prompt_ids), ForwardBatch.build([SequenceChunk(table, 0, len(prompt_ids))], 16), cache)
        return model(torch.tensor([next_id]), ForwardBatch.build([SequenceChunk(table, len(prompt_ids), 1)], 16), cache)[0]


@needs_kernel
def test_decode_logits_match_the_dense_twin(smollm2):
    ids = chat_ids(smollm2, PROMPTS[0])
    blocks = decode_logits(prepacked(smollm2.model, smollm2.block_weights), smollm2, ids, next_id=504)
    dense = decode_logits(prepacked(smollm2.model), smollm2, ids, next_id=504)
    # float32 rounding of two summation orders on logits of magnitude ~30 (observed ~1e-5; test_smollm2 allows 1e-3 against HF)
    assert (blocks - dense).abs().max().item() <= 1e-3
    assert blocks.argmax() == dense.argmax()
