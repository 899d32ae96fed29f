"""The `local` hardware: the same roofline cost model, its numbers fitted to a measured profile.

Engine steps (profile.py) fit four numbers by least relative squared error: an effective
FLOP/s, an effective memory bandwidth (both with efficiency 1: the fit already is the
achieved rate), a fixed cost per step and a cost per sequence. (F, B) are searched on a
log grid, refined twice; for each the two overheads solve a non-negative least squares.

Each mode's stack probe then says what its serving path adds, each from its own measurement
(so `local` is one hardware per mode):
- slowdown: a worker inside the running stack computes slower than alone (the gateway,
  NATS and the other worker share the cores): the long-minus-short TTFT over the fitted
  engine's long-minus-short prefill, never below 1; every engine time is scaled by it;
- request overhead: the short prompt's TTFT beyond its (slowed) engine prefill;
- step overhead in the stack: the steady gap between tokens beyond a (slowed) batch-1 decode
  step (streaming each token from the worker);
- hand-off: UCX bandwidth = KV bytes / UCX seconds of a real hand-off; its fixed overhead =
  the gap before token 2 beyond the steady gap, half a step (joining at a step boundary)
  and the bytes' time.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

import numpy as np

from planner.cost_model import CostModel, StepShape, decode_batch, prompt_chunk
from planner.efficiency import Efficiency
from planner.hardware import Hardware
from planner.model_spec import ModelSpec
from planner.profile import LocalProfile, StackProbe, StepSample
from services.scheduler.policy import Mode
from shared.layouts import DecoderLayout

KV_CACHE_TOKENS = 32768  # pdserve up's --kv-cache-tokens
FLOAT32 = 4


@dataclass(frozen=True)
class EngineFit:
    flops: float
    bandwidth: float
    step_s: float
    seq_s: float
    relative_rms: float  # of the fit over the samples


def _shape(sample: StepSample) -> StepShape:
    if sample.new_tokens == 1 and sample.context:
        return decode_batch(sample.batch, sample.context)
    return prompt_chunk(sample.new_tokens, sample.context)


def _hardware(flops: float, bandwidth: float, efficiency: Efficiency, nic: float = 1e9) -> Hardware:
    return Hardware(name="local", flops=flops, hbm_bandwidth=bandwidth, hbm_bytes=64e9, nvlink_domain=1,
                    nvlink_bandwidth=nic, nic_bandwidth=nic, efficiency=efficiency, weight_bytes=FLOAT32,
                    kv_bytes=FLOAT32, default_devices=2, kv_cache_tokens=KV_CACHE_TOKENS, max_world=1,
                    description="this machine, fitted to a measured profile (pdserve plan --hardware local)")


_UNIT = Efficiency(gemm=1, attention=1, hbm=1, nvlink=1, nic=1, ep_imbalance=1, memory_reserve=0, nvlink_latency_s=0,
                   nic_latency_s=0, step_overhead_s=0, seq_overhead_s=0, request_overhead_s=0, handoff_overhead_s=0)


def _roofline_times(model: ModelSpec, flops: float, bandwidth: float, shapes: list[StepShape]) -> np.ndarray:
    cost = CostModel(model, _hardware(flops, bandwidth, _UNIT), DecoderLayout())
    return np.array([cost.step_time(s) for s in shapes])


def fit_engine(model: ModelSpec, samples: list[StepSample]) -> EngineFit:
    shapes = [_shape(s) for s in samples]
    measured = np.array([s.seconds for s in samples])
    seqs = np.array([float(s.batch) for s in samples])

    def solve(log_f: float, log_b: float) -> tuple[float, float, float]:
        roofline = _roofline_times(model, 10**log_f, 10**log_b, shapes)
        # minimise sum(((roofline + a + b * seqs) - measured) / measured)^2 over a, b >= 0
        design = np.stack([np.ones_like(seqs), seqs], axis=1) / measured[:, None]
        target = (measured - roofline) / measured
        best = (math.inf, 0.0, 0.0)
        for cols in ((0, 1), (0,), (1,), ()):
            coef = np.zeros(2)
            if cols:
                solution, *_ = np.linalg.lstsq(design[:, cols], target, rcond=None)
                if (solution < 0).any():
                    continue
                coef[list(cols)] = solution
            error = float(np.sum((design @ coef - target) ** 2))
            best = min(best, (error, coef[0], coef[1]))
        return best

    center, span = (11.0, 11.0), 3.0
    for _ in range(3):  # a 13 x 13 grid, then finer around the best
        grid = [(center[0] + i * span / 6, center[1] + j * span / 6) for i in range(-6, 7) for j in range(-6, 7)]
        scored = [(solve(f, b), f, b) for f, b in grid]
        (error, step, seq), log_f, log_b = min(scored, key=lambda item: item[0][0])
        center, span = (log_f, log_b), span / 4
    return EngineFit(10**log_f, 10**log_b, step, seq, math.sqrt(error / len(samples)))


def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else 0.0


def _efficiency(**overheads: float) -> Efficiency:
    return Efficiency(gemm=1, attention=1, hbm=1, nvlink=1, nic=1, ep_imbalance=1, memory_reserve=0,
                      nvlink_latency_s=0, nic_latency_s=0, **overheads)


def fit_mode(model: ModelSpec, engine: EngineFit, probe: StackProbe, created: str) -> Hardware:
    """The hardware one mode's stack behaves like: the engine fit, slowed and extended by the probe."""
    alone = _hardware(engine.flops, engine.bandwidth, _efficiency(
        step_overhead_s=engine.step_s, seq_overhead_s=engine.seq_s, request_overhead_s=0, handoff_overhead_s=0))
    cost = CostModel(model, alone, DecoderLayout())
    short_prompt = min(s.prompt for s in probe.samples)
    long_prompt = max(s.prompt for s in probe.samples)
    short = [s for s in probe.samples if s.prompt == short_prompt]
    long = [s for s in probe.samples if s.prompt == long_prompt]
    engine_short = cost.step_time(prompt_chunk(short_prompt, 0))
    engine_long = cost.step_time(prompt_chunk(long_prompt, 0))
    ttft_short, ttft_long = _median(s.ttft_s for s in short), _median(s.ttft_s for s in long)
    slowdown = max(1.0, (ttft_long - ttft_short) / max(engine_long - engine_short, 1e-9))
    request_overhead = max(0.0, ttft_short - slowdown * engine_short)
    steady_gap = _median(g for s in long for g in s.gaps_s[1:])
    decode_step = slowdown * cost.step_time(decode_batch(1, long_prompt + len(long[0].gaps_s) // 2))
    stack_step = max(0.0, steady_gap - decode_step)
    handoff_overhead, bandwidth = 0.0, 1e9
    if probe.kv_seconds > 0:
        bandwidth = probe.kv_bytes / probe.kv_seconds
        gap2 = _median(s.gaps_s[0] for s in long)
        handoff_overhead = max(0.0, gap2 - 1.5 * steady_gap - probe.kv_bytes / bandwidth)
    efficiency = _efficiency(
        step_overhead_s=slowdown * engine.step_s + stack_step,
        seq_overhead_s=slowdown * engine.seq_s,
        request_overhead_s=request_overhead,
        handoff_overhead_s=handoff_overhead,
    )
    notes = (
        f"engine alone: {engine.flops / 1e9:.3g} GFLOP/s, {engine.bandwidth / 1e9:.3g} GB/s, {engine.step_s * 1e3:.3g} ms/step, "
        f"{engine.seq_s * 1e6:.3g} us/sequence (relative RMS error of the fit {engine.relative_rms:.0%})",
        f"in the stack: x{slowdown:.2f} slower, +{request_overhead * 1e3:.3g} ms per request, +{stack_step * 1e3:.3g} ms per step"
        + (f", hand-off +{handoff_overhead * 1e3:.3g} ms and {bandwidth / 1e9:.3g} GB/s over UCX" if probe.kv_seconds > 0 else ""),
        f"measured {created}",
    )
    fitted = _hardware(engine.flops / slowdown, engine.bandwidth / slowdown, efficiency, nic=bandwidth)
    return replace(fitted, sources=notes)


def fit_local(model: ModelSpec, profile: LocalProfile) -> dict[Mode, Hardware]:
    """The `local` hardware per serving mode: one engine fit, each mode's stack on top."""
    engine = fit_engine(model, profile.steps)
    when = f"{profile.created} on {profile.machine}, {profile.devices} workers x {profile.threads} thread(s)"
    return {Mode(mode): fit_mode(model, engine, probe, when) for mode, probe in profile.stacks.items()}
