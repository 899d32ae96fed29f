"""Re-shard kernels: gather -> scatter equals the token-by-token oracle; Triton equals torch."""

import dataclasses
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run kernels on the CPU

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.reshard_reference import read_dense, reference_reshard, reference_shards, write_dense
from kernels.reshard_triton import scatter_pair_buffers_triton
from shared.kv_spec import KvSpec
from shared.reshard.gather import gather_pair_buffers, slice_pair_buffers
from shared.reshard.scatter import pair_buffers_to_shards, scatter_pair_buffers
from shared.layouts import DecoderLayout, PrefillLayout, valid_ep, valid_tp
from shared.transfer_plan import plan_transfer

SENTINEL = -7.0  # untouched cache cells keep it: a stray write shows up as a mismatch
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_cache(spec, num_blocks, generator):
    shape = spec.cache_shape(num_blocks)
    return (torch.randn(shape, generator=generator).to(spec.dtype), torch.randn(shape, generator=generator).to(spec.dtype))


def sentinel_cache(spec, num_blocks):
    key = torch.full(spec.cache_shape(num_blocks), SENTINEL, dtype=spec.dtype)
    return key, key.clone()


def block_table(num_tokens, page_size, rng, spare=2):
    pages = -(-num_tokens // page_size)
    ids = list(range(pages + spare))
    rng.shuffle(ids)
    return ids[:pages], pages + spare


@st.composite
def reshard_cases(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3, 6]))
    base = KvSpec(
        "model",
        num_layers=draw(st.integers(1, 5)),
        num_q_heads=kv_heads * draw(st.sampled_from([1, 2, 4])),
        num_kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([2, 4, 6])),
        num_experts=draw(st.sampled_from([0, 4])),
    )

    def storage():
        return dict(
            dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])),
            page_size=draw(st.sampled_from([1, 2, 3, 4, 8])),
            memory_layout=draw(st.sampled_from(["NHD", "HND"])),
        )

    src_spec = dataclasses.replace(base, **storage())
    dst_spec = dataclasses.replace(base, **storage())

    def layout(kind):
        tp = draw(st.sampled_from([t for t in valid_tp(base) if t <= 12]))
        pp = draw(st.integers(1, min(3, base.num_layers)))
        dp = 1 if kind == "prefill" else draw(st.integers(1, 3))
        ep = draw(st.sampled_from(valid_ep(base, dp * tp * pp)))
        return PrefillLayout(tp=tp, pp=pp, ep=ep) if kind == "prefill" else DecoderLayout(dp=dp, tp=tp, pp=pp, ep=ep)

    dst = layout("decode")
    group = draw(st.integers(0, dst.dp - 1))
    return src_spec, dst_spec, layout("prefill"), dst, group, draw(st.integers(1, 20)), draw(st.integers(0, 2**16))


@settings(max_examples=300, deadline=None)
@given(reshard_cases())
def test_scatter_of_gather_equals_the_reference_reshard(case):
    src_spec, dst_spec, src, dst, group, num_tokens, seed = case
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    plan = plan_transfer(src, dst, src_spec, dst_spec, group)
    src_table, src_blocks = block_table(num_tokens, src_spec.page_size, rng)
    src_key, src_value = random_cache(src_spec, src_blocks, generator)
    kv = read_dense(src_key, src_value, src_spec, src_table, num_tokens)  # [L, 2, T, H, D]

    buffers = gather_pair_buffers(src_key, src_value, src_table, num_tokens, plan)
    assert len(buffers) == len(plan.pairs)
    assert sum(b.numel() * b.element_size() for b in buffers) == plan.nbytes(num_tokens)
    for gathered, sliced in zip(buffers, slice_pair_buffers(kv, plan)):
        assert torch.equal(gathered, sliced)

    dst_table, dst_blocks = block_table(num_tokens, dst_spec.page_size, rng)
    got_key, got_value = sentinel_cache(dst_spec, dst_blocks)
    want_key, want_value = sentinel_cache(dst_spec, dst_blocks)
    scatter_pair_buffers([b.view(torch.uint8) for b in buffers], plan, got_key, got_value, dst_table, num_tokens)
    reference_reshard(kv, dst_spec, want_key, want_value, dst_table)
    assert torch.equal(got_key, want_key) and torch.equal(got_value, want_value)  # bit for bit (casts included)

    shards = pair_buffers_to_shards(buffers, plan, num_tokens)
    oracle = reference_shards(kv, dst, dst_spec, group)
    assert shards.keys() == oracle.keys()
    for rank, shard in shards.items():
        assert torch.equal(shard, oracle[rank])


def test_oracle_round_trip_and_placement():
    spec = KvSpec("m", num_layers=2, num_q_heads=2, num_kv_heads=2, head_dim=3, page_size=4, memory_layout="HND")
    kv = torch.arange(2 * 2 * 6 * 2 * 3, dtype=torch.float32).reshape(2, 2, 6, 2, 3)
    key, value = sentinel_cache(spec, 3)
    write_dense(kv, key, value, spec, [2, 0])
    assert torch.equal(value[1, 0, 1, 1], kv[1, 1, 5, 1])  # token 5 -> page 1 (block 0), slot 1, head 1
    assert torch.equal(key[0, 2, 0, 3], kv[0, 0, 3, 0])  # token 3 -> page 0 (block 2), slot 3
    assert torch.all(key[:, 1] == SENTINEL)
    assert torch.equal(read_dense(key, value, spec, [2, 0], 6), kv)


TRITON_CASES = [
    # (kv heads, head dim, src tp, src pp, dst dp/tp/pp, group, src page/layout/dtype, dst page/layout/dtype, tokens)
    (4, 8, 4, 1, (2, 2, 1), 1, (4, "NHD", torch.float32), (4, "NHD", torch.float32), 13),
    (6, 6, 3, 2, (1, 2, 1), 0, (5, "NHD", torch.float32), (4, "HND", torch.float32), 23),
    (3, 4, 1, 1, (1, 9, 2), 0, (2, "HND", torch.float16), (8, "NHD", torch.float16), 17),
    (2, 8, 4, 1, (1, 1, 1), 0, (16, "NHD", torch.float32), (3, "HND", torch.bfloat16), 70),
    (2, 6, 2, 1, (2, 1, 1), 1, (3, "HND", torch.float32), (7, "NHD", torch.float16), 9),
    (1, 4, 1, 2, (1, 2, 3), 0, (1, "NHD", torch.bfloat16), (2, "HND", torch.float32), 5),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"case{i}" for i in range(len(TRITON_CASES))])
def test_triton_scatter_matches_torch_scatter(case):
    heads, dim, src_tp, src_pp, (dp, tp, pp), group, src_store, dst_store, num_tokens = case
    base = KvSpec("m", num_layers=3, num_q_heads=max(heads, 9 if heads == 3 else heads * 2), num_kv_heads=heads, head_dim=dim)
    src_spec = dataclasses.replace(base, page_size=src_store[0], memory_layout=src_store[1], dtype=src_store[2])
    dst_spec = dataclasses.replace(base, page_size=dst_store[0], memory_layout=dst_store[1], dtype=dst_store[2])
    plan = plan_transfer(PrefillLayout(tp=src_tp, pp=src_pp), DecoderLayout(dp=dp, tp=tp, pp=pp), src_spec, dst_spec, group)
    rng, generator = random.Random(7), torch.Generator().manual_seed(7)
    src_table, src_blocks = block_table(num_tokens, src_spec.page_size, rng)
    src_key, src_value = random_cache(src_spec, src_blocks, generator)
    buffers = gather_pair_buffers(src_key, src_value, src_table, num_tokens, plan)
    dst_table, dst_blocks = block_table(num_tokens, dst_spec.page_size, rng)

    want_key, want_value = sentinel_cache(dst_spec, dst_blocks)
    scatter_pair_buffers(buffers, plan, want_key, want_value, dst_table, num_tokens)
    got_key, got_value = (t.to(DEVICE) for t in sentinel_cache(dst_spec, dst_blocks))
    wire = [b.view(torch.uint8).to(DEVICE) for b in buffers]
    scatter_pair_buffers_triton(wire, plan, got_key, got_value, torch.tensor(dst_table, device=DEVICE), num_tokens)

    if src_spec.dtype == dst_spec.dtype or dst_spec.dtype == torch.float32:
        assert torch.equal(got_key.cpu(), want_key) and torch.equal(got_value.cpu(), want_value)
    else:  # a downcast: the interpreter truncates where torch rounds to nearest even (GPU Triton rounds too)
        ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dst_spec.dtype]
        torch.testing.assert_close(got_key.cpu(), want_key, rtol=ulp, atol=0)
        torch.testing.assert_close(got_value.cpu(), want_value, rtol=ulp, atol=0)
    assert torch.equal(got_key.cpu() == SENTINEL, want_key == SENTINEL)  # same cells written


def test_triton_wrapper_validates_its_inputs():
    spec = KvSpec("m", num_layers=2, num_q_heads=2, num_kv_heads=2, head_dim=4, page_size=4)
    plan = plan_transfer(PrefillLayout(), DecoderLayout(), spec, spec)
    buffers = [torch.zeros(plan.pairs[0].numel(8))]
    key, value = sentinel_cache(spec, 4)
    with pytest.raises(ValueError) as short_table:
        scatter_pair_buffers_triton(buffers, plan, key, value, torch.tensor([0]), 8)
    with pytest.raises(ValueError) as wrong_dtype:
        scatter_pair_buffers_triton(buffers, plan, key.half(), value.half(), torch.tensor([0, 1]), 8)
    with pytest.raises(ValueError) as wrong_size:
        scatter_pair_buffers_triton(buffers, plan, key, value, torch.tensor([0, 1, 2]), 9)
    reversed_strides = torch.full(value.shape[::-1], SENTINEL).permute(4, 3, 2, 1, 0)  # same shape, other strides
    with pytest.raises(ValueError) as strided:
        scatter_pair_buffers_triton(buffers, plan, key, reversed_strides, torch.tensor([0, 1]), 8)
    assert "block table too short" in str(short_table.value)
    assert "differs from the spec" in str(wrong_dtype.value)
    assert "9 tokens need" in str(wrong_size.value)
    assert "equal strides" in str(strided.value)
    assert torch.all(key == SENTINEL)


@pytest.mark.parametrize("memory_layout", ["NHD", "HND"])
def test_scatter_into_a_fragmented_table_and_a_strided_cache_equals_the_reference(memory_layout):
    # 90 shuffled pages break into far more runs than `PageMap.write` takes one copy each
    # for (its index_copy_ fallback); a strided cache takes the per-run copies instead.
    spec = KvSpec("m", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=4, page_size=2, memory_layout=memory_layout)
    plan = plan_transfer(PrefillLayout(tp=2), DecoderLayout(), spec, spec)
    rng, generator = random.Random(3), torch.Generator().manual_seed(3)
    num_tokens = 179
    src_table, src_blocks = block_table(num_tokens, spec.page_size, rng)
    src_key, src_value = random_cache(spec, src_blocks, generator)
    kv = read_dense(src_key, src_value, spec, src_table, num_tokens)
    buffers = gather_pair_buffers(src_key, src_value, src_table, num_tokens, plan)
    dst_table, dst_blocks = block_table(num_tokens, spec.page_size, rng)
    want_key, want_value = sentinel_cache(spec, dst_blocks)
    reference_reshard(kv, spec, want_key, want_value, dst_table)

    got_key, got_value = sentinel_cache(spec, dst_blocks)
    scatter_pair_buffers(buffers, plan, got_key, got_value, dst_table, num_tokens)
    wide_key, wide_value = (torch.full((*t.shape[:-1], 2 * spec.head_dim), SENTINEL) for t in sentinel_cache(spec, dst_blocks))
    strided_key, strided_value = wide_key[..., : spec.head_dim], wide_value[..., : spec.head_dim]
    scatter_pair_buffers(buffers, plan, strided_key, strided_value, dst_table, num_tokens)

    assert torch.equal(got_key, want_key) and torch.equal(got_value, want_value)
    assert torch.equal(strided_key, want_key) and torch.equal(strided_value, want_value)
