"""Layouts: rank arithmetic, layer/head splits, validation messages, the CLI syntax; KV spec compatibility."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.kv_spec import IncompatibleKvError, KvSpec, check_compatible, compatibility_problem
from shared.layouts import DecoderLayout, LayoutError, PrefillLayout, parse_layout, valid_ep, valid_tp, validate

SMOLLM = KvSpec("smollm2", num_layers=30, num_q_heads=9, num_kv_heads=3, head_dim=64)
MOE = KvSpec("qwen3-moe", num_layers=48, num_q_heads=32, num_kv_heads=4, head_dim=128, num_experts=128)


def test_decoder_tp_defaults_to_ep_over_dp():
    assert DecoderLayout(dp=4, ep=16).tp == 4
    assert DecoderLayout(dp=4, ep=16).world == 16
    assert DecoderLayout(dp=4, ep=2).tp == 1  # ep // dp < 1 -> 1
    assert DecoderLayout(dp=2, ep=4) == DecoderLayout(dp=2, ep=4, tp=2)
    assert PrefillLayout(tp=4, ep=4).world == 4 and PrefillLayout().dp == 1


@settings(max_examples=60, deadline=None)
@given(dp=st.integers(1, 4), tp=st.integers(1, 6), pp=st.integers(1, 4))
def test_rank_numbering_is_a_bijection_with_tp_fastest(dp, tp, pp):
    layout = DecoderLayout(dp=dp, tp=tp, pp=pp)
    coords = layout.ranks()
    assert len(set(coords)) == layout.world == dp * tp * pp
    assert [layout.rank(*c) for c in coords] == list(range(layout.world))
    if tp > 1:
        assert layout.coord(1) == (0, 0, 1)
    assert layout.group_ranks(dp - 1) == list(range((dp - 1) * tp * pp, dp * tp * pp))


@settings(max_examples=80, deadline=None)
@given(layers=st.integers(1, 40), pp=st.integers(1, 8))
def test_layer_split_is_contiguous_and_earlier_stages_take_the_remainder(layers, pp):
    if pp > layers:
        return
    layout = PrefillLayout(pp=pp)
    stages = [layout.layers_of(p, layers) for p in range(pp)]
    assert [layer for stage in stages for layer in stage] == list(range(layers))
    sizes = [len(s) for s in stages]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1


def test_layer_split_examples():
    layout = PrefillLayout(pp=3)
    assert [layout.layers_of(p, 8) for p in range(3)] == [range(0, 3), range(3, 6), range(6, 8)]


def test_heads_split_or_replicate():
    assert [PrefillLayout(tp=3).kv_heads_of(t, 6) for t in range(3)] == [range(0, 2), range(2, 4), range(4, 6)]
    replicated = PrefillLayout(tp=4)
    assert [replicated.kv_heads_of(t, 2) for t in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [replicated.primary_tp_rank(h, 2) for h in range(2)] == [0, 2]
    assert [PrefillLayout(tp=2).primary_tp_rank(h, 4) for h in range(4)] == [0, 0, 1, 1]


def test_valid_choices_for_a_model():
    assert valid_tp(SMOLLM) == [1, 3, 9]  # 9 query heads; 3 KV heads split (1, 3) or replicated x3 (9)
    assert valid_ep(SMOLLM, world=4) == [1]
    assert valid_ep(MOE, world=16) == [1, 2, 4, 8, 16]
    validate(PrefillLayout(tp=3), SMOLLM)
    validate(DecoderLayout(dp=4, ep=16), MOE)


def test_bad_tp_names_the_problem_and_lists_valid_choices():
    with pytest.raises(LayoutError) as caught:
        validate(PrefillLayout(tp=4), SMOLLM)
    message = str(caught.value)
    assert "tp=4 does not divide the 9 query heads" in message
    assert "Valid tp: 1, 3, 9" in message
    assert "valid pp: 1..30" in message
    assert "valid ep for world=4: 1" in message


def test_pp_beyond_layers_and_ep_on_dense_model_are_refused_together():
    tiny = dataclasses.replace(SMOLLM, num_layers=2)
    with pytest.raises(LayoutError) as caught:
        validate(DecoderLayout(dp=1, ep=2, tp=1, pp=4), tiny)
    message = str(caught.value)
    assert "pp=4 exceeds the 2 layers" in message
    assert "ep=2 needs a mixture-of-experts model" in message
    assert "valid pp: 1, 2" in message


def test_kv_heads_neither_split_nor_replicated():
    spec = KvSpec("m", num_layers=4, num_q_heads=12, num_kv_heads=4, head_dim=8)
    with pytest.raises(LayoutError) as caught:
        validate(PrefillLayout(tp=6), spec)
    assert "tp=6 neither divides nor is a multiple of the 4 KV heads" in str(caught.value)
    assert "Valid tp: 1, 2, 4, 12" in str(caught.value)


def test_ep_must_divide_world_and_experts():
    with pytest.raises(LayoutError) as caught:
        DecoderLayout(dp=3, ep=4)
    assert "ep=4 must divide world" in str(caught.value) and "valid ep for this world: 1, 3" in str(caught.value)
    with pytest.raises(LayoutError) as caught:
        validate(DecoderLayout(dp=1, tp=2, ep=2), dataclasses.replace(MOE, num_experts=3))
    assert "ep=2 does not divide the 3 experts" in str(caught.value)


def test_parse_layout_round_trips_and_names_bad_keys():
    assert parse_layout("tp=4,ep=4", "prefill") == PrefillLayout(tp=4, ep=4)
    assert parse_layout(" dp=4 , ep=16 ", "decode") == DecoderLayout(dp=4, ep=16, tp=4)
    assert parse_layout("", "decode") == DecoderLayout()
    layout = DecoderLayout(dp=2, tp=2, pp=3, ep=4)
    assert parse_layout(layout.describe(), "decode") == layout
    with pytest.raises(LayoutError) as unknown:
        parse_layout("dp=2", "prefill")
    with pytest.raises(LayoutError) as bad_value:
        parse_layout("tp=two", "decode")
    with pytest.raises(LayoutError) as twice:
        parse_layout("tp=2,tp=4", "decode")
    with pytest.raises(LayoutError) as zero:
        parse_layout("pp=0", "prefill")
    assert "unknown key 'dp'" in str(unknown.value) and "valid keys: tp, pp, ep" in str(unknown.value)
    assert "tp='two' is not a positive integer" in str(bad_value.value)
    assert "'tp' given twice" in str(twice.value)
    assert "pp='0'" in str(zero.value)


def test_compatibility_names_the_first_mismatching_field():
    base = SMOLLM
    assert compatibility_problem(base, dataclasses.replace(base, page_size=32, memory_layout="HND")) is None
    assert compatibility_problem(base, dataclasses.replace(base, dtype=torch.bfloat16)) is None  # cast
    cases = {
        "model_fingerprint": dataclasses.replace(base, model_fingerprint="other"),
        "num_layers": dataclasses.replace(base, num_layers=24),
        "head_dim": dataclasses.replace(base, head_dim=128),
        "num_kv_heads": dataclasses.replace(base, num_kv_heads=1),
        "dtype": dataclasses.replace(base, dtype=torch.float8_e4m3fn),
    }
    for field, other in cases.items():
        with pytest.raises(IncompatibleKvError) as caught:
            check_compatible(base, other)
        assert caught.value.field == field
    assert "model fingerprint differ" in compatibility_problem(base, cases["model_fingerprint"])
    assert "head_dim differ (source 64, destination 128)" in compatibility_problem(base, cases["head_dim"])
    assert "only float32/float16/bfloat16 are cast" in compatibility_problem(base, cases["dtype"])
    strict = compatibility_problem(base, dataclasses.replace(base, dtype=torch.float16), allow_dtype_cast=False)
    assert strict is not None and "dtype differs (source float32, destination float16)" in strict


def test_kv_spec_rejects_nonsense():
    with pytest.raises(ValueError, match="num_q_heads"):
        KvSpec("m", num_layers=2, num_q_heads=5, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="memory_layout"):
        KvSpec("m", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8, memory_layout="NDH")
