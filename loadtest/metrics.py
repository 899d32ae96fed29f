"""From request outcomes to the summary: percentiles, throughput, goodput.

Only successful requests enter latency statistics and token totals (as in
`vllm bench serve`); failed ones are counted in `failed`. Percentiles use numpy's linear
interpolation. A statistic with no samples (e.g. TPOT when every request produced one
token) is None, written as JSON null, never a made-up 0.

Metrics, per request: TTFT (time to first token); TPOT (time per output token after the
first: (e2el - ttft) / (output_len - 1)); ITL (every gap between consecutive token
chunks, pooled over all requests); E2EL (end-to-end latency).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loadtest.client import RequestOutcome

METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], p: float) -> float:
    if not len(values):
        raise ValueError("percentile of no samples")
    return float(np.percentile(np.asarray(values, dtype=np.float64), p))


def describe_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, median, std and the PERCENTILES of samples given in seconds, in milliseconds."""
    keys = ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES)]
    if not len(values_s):
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    stats = {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std())}
    return stats | {f"p{p}": percentile(ms, p) for p in PERCENTILES}


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput; a request is good if it meets every one given."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, items: Sequence[str]) -> SLO:
        """From `ttft:500 tpot:50` (milliseconds)."""
        limits = {}
        for item in items:
            name, sep, value = item.partition(":")
            if not sep or name not in ("ttft", "tpot", "e2el"):
                raise ValueError(f"goodput SLO {item!r}: expected ttft:MS, tpot:MS or e2el:MS")
            limits[f"{name}_ms"] = float(value)
            if limits[f"{name}_ms"] <= 0:
                raise ValueError(f"goodput SLO {item!r}: must be > 0")
        return cls(**limits)

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))

    def met_by(self, outcome: RequestOutcome) -> bool:
        if not outcome.success:
            return False
        tpot = outcome.tpot_s or 0.0
        checks = ((self.ttft_ms, outcome.ttft_s), (self.tpot_ms, tpot), (self.e2el_ms, outcome.e2el_s))
        return all(limit is None or value * 1000.0 <= limit for limit, value in checks)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2el", self.e2el_ms)) if v is not None}


def _samples(ok: list[RequestOutcome]) -> dict[str, list[float]]:
    return {
        "ttft": [o.ttft_s for o in ok],
        "tpot": [o.tpot_s for o in ok if o.tpot_s is not None],
        "itl": [gap for o in ok for gap in o.itls_s],
        "e2el": [o.e2el_s for o in ok],
    }


def summarize(outcomes: Sequence[RequestOutcome], duration_s: float, workers: int = 1, slo: SLO = SLO()) -> dict:
    """The flat summary, keyed like `vllm bench serve` (mean_ttft_ms, p99_itl_ms, ...)."""
    if duration_s <= 0 or workers < 1:
        raise ValueError(f"need duration > 0 and workers >= 1, got {duration_s}, {workers}")
    ok = [o for o in outcomes if o.success]
    total_in, total_out = sum(o.input_len for o in ok), sum(o.output_len for o in ok)
    summary = {
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": sum(slo.met_by(o) for o in ok) / duration_s if slo.given else None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "workers": workers,
        "request_throughput_per_worker": len(ok) / duration_s / workers,
        "output_throughput_per_worker": total_out / duration_s / workers,
    }
    for metric, samples in _samples(ok).items():
        for stat, value in describe_ms(samples).items():
            summary[f"{stat}_{metric}_ms"] = value
    return summary
