"""Every factor that turns datasheet peaks into achieved speed, and every assumed latency: one place.

The hardware presets carry datasheet numbers only (hardware.py). What a real serving
stack reaches of them is stated here, once, with the reasoning; the `local` hardware
replaces all of it by numbers fitted to measurements of this machine (fit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Efficiency:
    # Share of peak dense FLOP/s that large GEMMs reach (prefill, big batches). Tuned GEMMs on
    # H100/B200 reach 60-75% of the bf16 peak; serving kernels with odd shapes less.
    gemm: float = 0.6
    # Share of peak FLOP/s attention kernels reach (FlashAttention-2/3 report 50-75% on H100).
    attention: float = 0.5
    # Share of peak HBM bandwidth that streaming weights and KV reaches (STREAM-like ~80-90%).
    hbm: float = 0.8
    # Share of the per-direction NVLink bandwidth NCCL collectives reach as bus bandwidth.
    nvlink: float = 0.7
    # Share of the NIC line rate that KV transfers and cross-domain collectives reach.
    nic: float = 0.8
    # Busiest expert-parallel rank over the mean: routing is never perfectly balanced.
    ep_imbalance: float = 1.2
    # HBM kept for activations, CUDA graphs and fragmentation (vLLM's default gpu_memory_utilization is 0.9).
    memory_reserve: float = 0.1
    # Fixed cost of one collective call (launch + synchronisation), inside / across an NVLink domain.
    nvlink_latency_s: float = 5e-6
    nic_latency_s: float = 15e-6
    # Host work per engine step (schedule, batch metadata, launch): a CUDA-graph engine spends ~0.3-1 ms.
    step_overhead_s: float = 0.5e-3
    # Host work per sequence in a step (block tables, sampling bookkeeping).
    seq_overhead_s: float = 2e-6
    # Serving path outside the engine that a TTFT carries: HTTP, tokenization, NATS placement, stream.
    request_overhead_s: float = 2e-3
    # Fixed cost of one KV hand-off besides the bytes: offer/accept over NATS, page reservation, scatter launch.
    handoff_overhead_s: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("gemm", "attention", "hbm", "nvlink", "nic"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"Efficiency.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.ep_imbalance < 1:
            raise ValueError(f"Efficiency.ep_imbalance must be >= 1, got {self.ep_imbalance}")
        if not 0 <= self.memory_reserve < 1:
            raise ValueError(f"Efficiency.memory_reserve must be in [0, 1), got {self.memory_reserve}")
        for f in fields(self):
            if f.name.endswith("_s") and getattr(self, f.name) < 0:
                raise ValueError(f"Efficiency.{f.name} must be >= 0, got {getattr(self, f.name)}")

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# What every GPU preset assumes (the defaults above, stated in docs/planner.md).
GPU_EFFICIENCY = Efficiency()
