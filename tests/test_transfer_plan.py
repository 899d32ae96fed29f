"""Transfer plans: every destination rank gets exactly its shard, once, in one buffer per rank pair."""

import dataclasses
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.kv_spec import IncompatibleKvError, KvSpec
from shared.layouts import DecoderLayout, LayoutError, PrefillLayout, valid_ep, valid_tp
from shared.transfer_plan import plan_transfer


@st.composite
def specs(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    return KvSpec(
        "model",
        num_layers=draw(st.integers(1, 6)),
        num_q_heads=kv_heads * draw(st.sampled_from([1, 2, 4])),
        num_kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([2, 4, 8])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        num_experts=draw(st.sampled_from([0, 8])),
    )


@st.composite
def layouts(draw, spec, kind):
    tp = draw(st.sampled_from([t for t in valid_tp(spec) if t <= 12]))
    pp = draw(st.integers(1, min(4, spec.num_layers)))
    dp = 1 if kind == "prefill" else draw(st.integers(1, 3))
    ep = draw(st.sampled_from(valid_ep(spec, dp * tp * pp)))
    return PrefillLayout(tp=tp, pp=pp, ep=ep) if kind == "prefill" else DecoderLayout(dp=dp, tp=tp, pp=pp, ep=ep)


@st.composite
def plan_cases(draw):
    spec = draw(specs())
    dst = draw(layouts(spec, "decode"))
    return spec, draw(layouts(spec, "prefill")), dst, draw(st.integers(0, dst.dp - 1))


def cells(segment):
    return {(layer, head) for layer in range(segment.layer_start, segment.layer_stop) for head in range(segment.head_start, segment.head_stop)}


@settings(max_examples=150, deadline=None)
@given(plan_cases())
def test_every_destination_rank_receives_exactly_its_shard_once(case):
    spec, src, dst, group = case
    plan = plan_transfer(src, dst, spec, spec, group)
    received: dict[int, Counter] = {}
    for segment in plan.segments:
        received.setdefault(segment.dst_rank, Counter()).update(cells(segment))
        # the sender holds those cells, and is the lowest replica of those heads
        coord = src.coord(segment.src_rank)
        assert set(range(segment.layer_start, segment.layer_stop)) <= set(src.layers_of(coord.pp, spec.num_layers))
        assert set(range(segment.head_start, segment.head_stop)) <= set(src.kv_heads_of(coord.tp, spec.num_kv_heads))
        assert all(src.primary_tp_rank(h, spec.num_kv_heads) == coord.tp for h in range(segment.head_start, segment.head_stop))
    assert set(received) == set(dst.group_ranks(group))
    for rank, counts in received.items():
        coord = dst.coord(rank)
        wanted = {(l, h) for l in dst.layers_of(coord.pp, spec.num_layers) for h in dst.kv_heads_of(coord.tp, spec.num_kv_heads)}
        assert set(counts) == wanted and set(counts.values()) == {1}
    shard_cells = sum(len(dst.layers_of(c.pp, spec.num_layers)) * len(dst.kv_heads_of(c.tp, spec.num_kv_heads)) for c in map(dst.coord, dst.group_ranks(group)))
    assert plan.bytes_per_token == shard_cells * 2 * spec.head_dim * spec.itemsize


@settings(max_examples=100, deadline=None)
@given(plan_cases())
def test_one_buffer_per_rank_pair_with_packed_pieces(case):
    spec, src, dst, group = case
    plan = plan_transfer(src, dst, spec, spec, group)
    keys = [(p.src_rank, p.dst_rank) for p in plan.pairs]
    assert keys == sorted(set(keys))  # unique and ordered
    for pair in plan.pairs:
        assert pair.pieces
        offset = 0
        for piece in pair.pieces:
            seg = piece.segment
            assert (seg.src_rank, seg.dst_rank) == (pair.src_rank, pair.dst_rank)
            assert piece.offset_per_token == offset
            assert piece.elems_per_token == seg.num_layers * 2 * seg.num_heads * spec.head_dim
            offset += piece.elems_per_token
        assert pair.elems_per_token == offset
        assert plan.pair_nbytes(pair, 7) == offset * 7 * spec.itemsize


def test_plans_are_cached_per_argument_tuple():
    spec = KvSpec("m", num_layers=4, num_q_heads=8, num_kv_heads=4, head_dim=8)
    first = plan_transfer(PrefillLayout(tp=4), DecoderLayout(dp=2, tp=2), spec, spec, 1)
    again = plan_transfer(PrefillLayout(tp=4), DecoderLayout(dp=2, ep=1, tp=2), spec, dataclasses.replace(spec), 1)
    assert first is again


def test_tp4_to_dp2_tp2_on_four_heads():
    spec = KvSpec("m", num_layers=2, num_q_heads=8, num_kv_heads=4, head_dim=8)
    plan = plan_transfer(PrefillLayout(tp=4), DecoderLayout(dp=2, tp=2), spec, spec, dst_dp_group=1)
    assert [(s.src_rank, s.dst_rank, s.head_start, s.head_stop) for s in plan.segments] == [
        (0, 2, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3), (3, 3, 3, 4),
    ]
    assert plan.bytes_per_token == spec.bytes_per_token
    assert "4 rank pairs" in plan.summary() and f"{spec.bytes_per_token} bytes/token" in plan.summary()


def test_non_integer_head_ratio_tp3_to_tp2_on_six_heads():
    spec = KvSpec("m", num_layers=3, num_q_heads=6, num_kv_heads=6, head_dim=4)
    plan = plan_transfer(PrefillLayout(tp=3), DecoderLayout(tp=2), spec, spec)
    assert [(s.src_rank, s.dst_rank, s.head_start, s.head_stop) for s in plan.segments] == [
        (0, 0, 0, 2), (1, 0, 2, 3), (1, 1, 3, 4), (2, 1, 4, 6),
    ]


def test_replicated_source_heads_are_sent_once():
    spec = KvSpec("m", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=4)
    plan = plan_transfer(PrefillLayout(tp=4), DecoderLayout(tp=1), spec, spec)
    assert [(p.src_rank, p.dst_rank) for p in plan.pairs] == [(0, 0), (2, 0)]
    assert plan.bytes_per_token == spec.bytes_per_token


def test_replicated_destination_heads_reach_every_replica():
    spec = KvSpec("m", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=4)
    plan = plan_transfer(PrefillLayout(tp=1), DecoderLayout(tp=4), spec, spec)
    assert [(p.src_rank, p.dst_rank) for p in plan.pairs] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert plan.bytes_per_token == 2 * spec.bytes_per_token
    assert "2.00x the KV" in plan.summary()


def test_pipeline_stages_merge():
    spec = KvSpec("m", num_layers=5, num_q_heads=2, num_kv_heads=2, head_dim=4)
    plan = plan_transfer(PrefillLayout(pp=2), DecoderLayout(pp=1), spec, spec)
    assert [(s.src_rank, s.layer_start, s.layer_stop) for s in plan.segments] == [(0, 0, 3), (1, 3, 5)]


def test_refusals():
    spec = KvSpec("m", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=4)
    with pytest.raises(LayoutError) as bad_group:
        plan_transfer(PrefillLayout(), DecoderLayout(dp=2), spec, spec, dst_dp_group=2)
    with pytest.raises(IncompatibleKvError) as bad_spec:
        plan_transfer(PrefillLayout(), DecoderLayout(), spec, dataclasses.replace(spec, head_dim=8))
    with pytest.raises(LayoutError) as bad_layout:
        plan_transfer(PrefillLayout(tp=3), DecoderLayout(), spec, spec)
    assert "dp group 2 outside dp=2" in str(bad_group.value)
    assert bad_spec.value.field == "head_dim"
    assert "Valid tp: 1, 2, 4" in str(bad_layout.value)
