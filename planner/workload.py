"""The requests a simulation replays: the bench's own schedule (`loadtest/schedule.timings`).

The same workload and arrival flags as `pdserve bench` give the same send times and
lengths for the same seed, so a plan and a bench run see the identical schedule. For the
goodput search the same lengths arrive open loop at any rate (a trace: its own times,
scaled to the rate).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from loadtest.arrivals import ClosedLoop, LoadShape, OpenLoop
from loadtest.schedule import timings
from loadtest.workloads import LengthMix, Trace, Workload
from planner.simulator import Arrival

_STATS_SAMPLE = 2000  # requests drawn to estimate mean lengths


@dataclass(frozen=True)
class RequestSource:
    workload: Workload
    seed: int = 0
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a positive number, got {self.burstiness}")

    @property
    def name(self) -> str:
        return self.workload.name

    def lengths(self, n: int = _STATS_SAMPLE) -> list[tuple[int, int]]:
        return [(t.input_len, t.output_len) for t in itertools.islice(timings(self.workload, ClosedLoop(1), self.seed), n)]

    def mean_lengths(self) -> tuple[float, float]:
        pairs = self.lengths()
        return sum(i for i, _ in pairs) / len(pairs), sum(o for _, o in pairs) / len(pairs)

    def max_input_len(self) -> int:
        if isinstance(self.workload, LengthMix):
            return max(c.input_len.high for c in self.workload.classes)
        return max(r.input_len for r in self.workload.records)

    def max_request_tokens(self) -> int:
        if isinstance(self.workload, LengthMix):
            return self.workload.max_total_len()
        return max(r.input_len + r.output_len for r in self.workload.records)

    def at_rate(self, rate: float, num_requests: int) -> list[Arrival]:
        """Open-loop arrivals at `rate` per second (Poisson unless burstiness says otherwise)."""
        if isinstance(self.workload, Trace):
            return self._trace_at_rate(rate, num_requests)
        return self.shaped(OpenLoop(rate, self.burstiness), num_requests)

    def shaped(self, load: LoadShape, num_requests: int, duration_s: float | None = None) -> list[Arrival]:
        """Exactly the bench's schedule for this load (a trace replays its own times)."""
        arrivals = []
        for t in itertools.islice(timings(self.workload, load, self.seed), num_requests):
            if duration_s is not None and t.send_at > duration_s:
                break
            arrivals.append(Arrival(t.send_at, t.input_len, t.output_len))
        return arrivals

    def _trace_at_rate(self, rate: float, num_requests: int) -> list[Arrival]:
        records = self.workload.records[:num_requests]
        span = records[-1].timestamp_s - records[0].timestamp_s
        scale = (len(records) - 1) / span / rate if span > 0 and len(records) > 1 else 0.0
        return [Arrival(r.timestamp_s * scale, r.input_len, r.output_len) for r in records]
