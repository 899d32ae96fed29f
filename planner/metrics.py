"""From simulated requests to the numbers `pdserve bench` reports, and SLO attainment.

Definitions follow loadtest/metrics.py: TTFT from send to first token; TPOT = (end - first
token) / (tokens - 1) per request; ITL pools every gap between consecutive tokens of all
requests; throughput = output tokens / (first send .. last completion). Only completed
requests enter latencies; a request is *good* when it completed within every SLO given.
Percentiles interpolate linearly (numpy), the ITL ones over the pooled, counted gaps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.simulator import SimResult

ATTAINMENT = 0.9  # goodput: the share of requests that must meet the SLOs (DistServe's 90%)


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float

    def __post_init__(self) -> None:
        if not (self.ttft_ms > 0 and self.tpot_ms > 0):
            raise ValueError(f"SLOs must be > 0 ms, got ttft {self.ttft_ms}, tpot {self.tpot_ms}")

    def as_dict(self) -> dict[str, float]:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms}


@dataclass(frozen=True)
class Summary:
    completed: int
    failed: int
    p50_ttft_ms: float | None
    p99_ttft_ms: float | None
    mean_tpot_ms: float | None
    p50_itl_ms: float | None
    p99_itl_ms: float | None
    mean_e2el_ms: float | None
    output_throughput: float
    output_throughput_per_device: float
    request_throughput: float
    duration_s: float
    attainment: float | None  # share of all requests meeting the SLOs (None without SLOs)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def weighted_percentile(values: np.ndarray, weights: np.ndarray, p: float) -> float:
    """numpy's linear-interpolation percentile of `values`, each repeated `weights` times."""
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    n = weights.sum()
    rank = p / 100 * (n - 1)  # 0-based position in the repeated, sorted sample
    ends = np.cumsum(weights) - 1  # last 0-based position of each distinct value
    low = int(np.searchsorted(ends, np.floor(rank)))
    high = int(np.searchsorted(ends, np.ceil(rank)))
    frac = rank - np.floor(rank)
    return float(values[low] + (values[high] - values[low]) * frac)


def _ms(values: list[float], p: float) -> float | None:
    return float(np.percentile(values, p)) * 1000 if values else None


def summarize(result: SimResult, slo: Slo | None = None, scale: float = 1.0) -> Summary:
    """Statistics of the measured requests (after the warm-up); throughputs times `scale`
    when the run simulated 1/`scale` of the deployment (identical parts)."""
    overhead = result.request_overhead_s
    measured = result.measured
    ok = [r for r in measured if r.finished_at is not None]
    ttfts = [r.first_token_at - r.arrival + overhead for r in ok]
    tpots = [(r.finished_at - r.first_token_at) / (r.tokens - 1) for r in ok if r.tokens > 1]
    gaps, counts = result.gaps.arrays()
    start = min((r.arrival for r in measured), default=0.0)
    end = max((r.finished_at for r in ok), default=start)
    duration = max(end - start, 1e-9)
    tokens = sum(r.tokens for r in ok)
    attainment = None
    if slo is not None and measured:
        good = sum(1 for r, ttft in zip(ok, ttfts)
                   if ttft * 1000 <= slo.ttft_ms and (r.tokens < 2 or (r.finished_at - r.first_token_at) / (r.tokens - 1) * 1000 <= slo.tpot_ms))
        attainment = good / len(measured)
    return Summary(
        completed=len(ok),
        failed=len(measured) - len(ok),
        p50_ttft_ms=_ms(ttfts, 50),
        p99_ttft_ms=_ms(ttfts, 99),
        mean_tpot_ms=float(np.mean(tpots)) * 1000 if tpots else None,
        p50_itl_ms=weighted_percentile(gaps, counts, 50) * 1000 if len(gaps) else None,
        p99_itl_ms=weighted_percentile(gaps, counts, 99) * 1000 if len(gaps) else None,
        mean_e2el_ms=float(np.mean([r.finished_at - r.arrival + overhead for r in ok])) * 1000 if ok else None,
        output_throughput=tokens / duration * scale,
        output_throughput_per_device=tokens / duration / result.devices,
        request_throughput=len(ok) / duration * scale,
        duration_s=duration,
        attainment=attainment,
    )
