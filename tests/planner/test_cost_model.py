"""The roofline cost model against numbers worked out by hand (llama-3.1-8b on one H100)."""

import pytest

from planner.cost_model import CostModel, decode_batch, prompt_chunk
from planner.deployment import kv_tokens
from planner.hardware import B200_HGX8, GB200_NVL72, H100_HGX8
from planner.model_spec import load_model_spec
from shared.layouts import DecoderLayout, PrefillLayout

# llama-3.1-8b: hidden 4096, 32 layers, 32 heads / 8 KV heads of 128, MLP 14336, vocab 128256.
ATTN_PARAMS = 4096 * (2 * 32 * 128 + 2 * 8 * 128)  # q, o and k, v projections of one layer
MLP_PARAMS = 3 * 4096 * 14336
BODY_PARAMS = 32 * (ATTN_PARAMS + MLP_PARAMS)  # 6,979,321,856
HEAD_PARAMS = 128256 * 4096
KV_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # bytes, bf16
PAIR_FLOPS = 4 * 32 * 128 * 32  # QK^T and AV for one (query, key) pair, all layers
# H100 SXM with the stated efficiencies
GEMM = 989e12 * 0.6
ATTN = 989e12 * 0.5
HBM = 3.35e12 * 0.8
STEP_OVERHEAD = 0.5e-3
SEQ_OVERHEAD = 2e-6


@pytest.fixture(scope="module")
def cost():
    return CostModel(load_model_spec("llama-3.1-8b"), H100_HGX8, PrefillLayout(tp=1))


def test_model_derivations_match_the_published_configs():
    llama8, llama70, qwen = (load_model_spec(n) for n in ("llama-3.1-8b", "llama-3.1-70b", "qwen3-235b-a22b"))
    assert llama8.non_expert_params - HEAD_PARAMS * 2 == BODY_PARAMS
    assert llama8.total_params == pytest.approx(8.03e9, rel=0.01)
    assert llama70.total_params == pytest.approx(70.6e9, rel=0.01)
    assert qwen.total_params == pytest.approx(235e9, rel=0.01)  # "235B total"
    assert qwen.active_params == pytest.approx(22e9, rel=0.03)  # "A22B": 22B activated
    assert llama8.kv_bytes_per_token(2) == KV_PER_TOKEN
    assert qwen.kv_bytes_per_token(2) == 94 * 2 * 4 * 128 * 2


def test_a_whole_prompt_is_compute_bound_and_costs_what_the_hand_calculation_says(cost):
    tokens = 2048
    dense_compute = 2 * BODY_PARAMS * tokens / GEMM  # 48.2 ms
    dense_memory = BODY_PARAMS * 2 / HBM  # 5.2 ms: weights read once
    assert dense_compute > 9 * dense_memory
    pairs = tokens * (tokens + 1) / 2  # causal
    attention = max(PAIR_FLOPS * pairs / ATTN, KV_PER_TOKEN * (tokens + tokens) / HBM)
    head = max(2 * HEAD_PARAMS / GEMM, HEAD_PARAMS * 2 / HBM)  # one row sampled
    expected = dense_compute + attention + head + STEP_OVERHEAD + SEQ_OVERHEAD
    step = cost.cost(prompt_chunk(tokens, 0))
    assert step.bound == "compute"
    assert step.total_s == pytest.approx(expected, rel=1e-9)
    assert step.total_s == pytest.approx(0.05129, rel=1e-3)  # 48.2 + 2.2 attention + 0.4 head + 0.5 overhead (ms)


def test_a_batch_one_decode_is_bandwidth_bound_and_costs_what_the_hand_calculation_says(cost):
    context = 1000
    weights = BODY_PARAMS * 2 / HBM  # 5.21 ms to stream the weights once
    kv = KV_PER_TOKEN * (context + 1) / HBM  # the context read, its own K/V written
    head = HEAD_PARAMS * 2 / HBM
    expected = weights + kv + head + STEP_OVERHEAD + SEQ_OVERHEAD
    step = cost.cost(decode_batch(1, context))
    assert step.bound == "memory"
    assert step.total_s == pytest.approx(expected, rel=1e-9)
    assert step.total_s == pytest.approx(0.006151, rel=1e-3)  # 5.21 weights + 0.05 KV + 0.39 head + 0.5 overhead (ms)
    # a bigger batch shares the weight read: far less than 32x the time for 32x the tokens
    assert cost.step_time(decode_batch(32, context)) < 3 * step.total_s


def test_decode_runs_match_one_step_at_a_time(cost):
    shape = decode_batch(16, 500)
    run = cost.decode_run(shape, 5)
    singles = [cost.step_time(decode_batch(16, 500 + i)) for i in range(5)]
    assert list(run) == pytest.approx(singles, rel=1e-12)


def test_moe_reads_only_the_experts_its_tokens_touch():
    qwen = load_model_spec("qwen3-235b-a22b")
    cost = CostModel(qwen, GB200_NVL72, DecoderLayout(dp=4, ep=16))
    one, many = cost.cost(decode_batch(1, 2000)), cost.cost(decode_batch(512, 2000))
    # batch 1 touches 8 of 128 experts per layer; batch 512 nearly all of them
    assert 5 < many.memory_s / one.memory_s < 40


def test_collectives_across_the_nvlink_domain_cost_more_than_inside_it():
    qwen = load_model_spec("qwen3-235b-a22b")
    layout = DecoderLayout(dp=4, ep=16)
    inside = CostModel(qwen, GB200_NVL72, layout).cost(decode_batch(256, 4000))
    across = CostModel(qwen, B200_HGX8, layout).cost(decode_batch(256, 4000))  # ep=16 spans two 8-GPU nodes
    assert across.comm_s > 4 * inside.comm_s


def test_handoff_time_is_bytes_over_the_links_plus_overhead():
    qwen = load_model_spec("qwen3-235b-a22b")
    prefill = CostModel(qwen, GB200_NVL72, PrefillLayout(tp=4, ep=4))
    decode = DecoderLayout(dp=4, ep=16)  # tp 4: four rank pairs hold distinct KV heads
    nbytes = 6144 * qwen.kv_bytes_per_token(2)
    assert prefill.handoff_links(decode) == 4
    # the whole deployment inside the 72-GPU NVLink domain: 900 GB/s NVLink at 70% per link
    assert prefill.handoff_time(6144, decode, devices=72) == pytest.approx(1e-3 + nbytes / (900e9 * 0.7 * 4), rel=1e-12)
    # past one domain (two racks): 400 Gb/s ConnectX-7 at 80% per link
    assert prefill.handoff_time(6144, decode, devices=144) == pytest.approx(1e-3 + nbytes / (50e9 * 0.8 * 4), rel=1e-12)
    # 8-GPU nodes: a 16-GPU deployment hands off between nodes, over the NIC
    on_nodes = CostModel(qwen, B200_HGX8, PrefillLayout(tp=4, ep=4))
    assert on_nodes.handoff_time(6144, decode, devices=16) == pytest.approx(1e-3 + nbytes / (50e9 * 0.8 * 4), rel=1e-12)


def test_kv_capacity_comes_from_the_memory_left_after_the_weights():
    llama = load_model_spec("llama-3.1-8b")
    free = 80e9 * 0.9 - llama.total_params * 2
    assert kv_tokens(llama, H100_HGX8, DecoderLayout(tp=1)) == int(free // KV_PER_TOKEN)
    assert kv_tokens(load_model_spec("qwen3-235b-a22b"), H100_HGX8, DecoderLayout(tp=2, ep=2)) == 0  # does not fit
