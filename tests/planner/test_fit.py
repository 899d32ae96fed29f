"""fit.py recovers a machine from its own step times (profiles made from a known cost model)."""

import pytest

from planner.cost_model import CostModel, decode_batch, prompt_chunk
from planner.fit import _efficiency, _hardware, fit_engine, fit_local
from planner.model_spec import load_model_spec
from planner.profile import DECODE_POINTS, PREFILL_LENGTHS, LocalProfile, StackProbe, StackSample, StepSample
from services.scheduler.policy import Mode
from shared.layouts import DecoderLayout

MODEL = load_model_spec("tiny-llama")
TRUE = dict(flops=20e9, bandwidth=8e9, step_s=2e-3, seq_s=40e-6)


def true_cost() -> CostModel:
    efficiency = _efficiency(step_overhead_s=TRUE["step_s"], seq_overhead_s=TRUE["seq_s"], request_overhead_s=0, handoff_overhead_s=0)
    return CostModel(MODEL, _hardware(TRUE["flops"], TRUE["bandwidth"], efficiency), DecoderLayout())


def engine_samples() -> list[StepSample]:
    cost = true_cost()
    samples = [StepSample(1, n, 0, cost.step_time(prompt_chunk(n, 0))) for n in PREFILL_LENGTHS]
    return samples + [StepSample(b, 1, c, cost.step_time(decode_batch(b, c))) for b, c in DECODE_POINTS]


def test_the_engine_fit_reproduces_the_step_times_it_was_given():
    fit = fit_engine(MODEL, engine_samples())
    assert fit.relative_rms < 0.05
    assert fit.flops == pytest.approx(TRUE["flops"], rel=0.3)
    assert fit.step_s == pytest.approx(TRUE["step_s"], rel=0.3)


def test_each_modes_stack_adds_what_its_probe_measured():
    cost = true_cost()
    slowdown, request, per_step = 2.0, 0.010, 0.004
    short, long = 32, 1024

    def probe(extra_step: float) -> StackProbe:
        gap = slowdown * cost.step_time(decode_batch(1, long + 12)) + extra_step
        samples = [StackSample(n, request + slowdown * cost.step_time(prompt_chunk(n, 0)), (gap,) * 23) for n in (short, long)]
        return StackProbe(tuple(samples))

    profile = LocalProfile("tiny-llama", 2, 1, engine_samples(), {"colocated": probe(per_step), "disagg": probe(3 * per_step)})
    by_mode = fit_local(MODEL, profile)
    colocated, disagg = by_mode[Mode.COLOCATED], by_mode[Mode.DISAGG]
    assert colocated.efficiency.request_overhead_s == pytest.approx(request, rel=0.15)
    assert colocated.flops == pytest.approx(fit_engine(MODEL, profile.steps).flops / slowdown, rel=0.05)
    # the disaggregated stack's extra per-step cost shows up in its hardware only
    assert disagg.efficiency.step_overhead_s - colocated.efficiency.step_overhead_s == pytest.approx(2 * per_step, rel=0.1)
    assert colocated.max_world == 1 and colocated.kv_cache_tokens == 32768
