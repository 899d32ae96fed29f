"""Measured speeds a worker reports in its heartbeat, smoothed so one outlier does not swing placement."""

from __future__ import annotations

from dataclasses import dataclass

SMOOTHING = 0.3


def _ewma(previous: float, sample: float) -> float:
    return sample if previous == 0.0 else (1 - SMOOTHING) * previous + SMOOTHING * sample


@dataclass
class MeasuredRates:
    prefill_tokens_per_s: float = 0.0
    handoff_bytes_per_s: float = 0.0

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if seconds > 0:
            self.prefill_tokens_per_s = _ewma(self.prefill_tokens_per_s, num_tokens / seconds)

    def observe_handoff(self, nbytes: int, seconds: float) -> None:
        if seconds > 0 and nbytes > 0:
            self.handoff_bytes_per_s = _ewma(self.handoff_bytes_per_s, nbytes / seconds)
