"""When requests are sent: open-loop arrival processes and the closed-loop alternative.

Open loop (`OpenLoop`): requests arrive on their own clock, whatever the server does, so a
slow server builds a queue — the honest way to measure latency under load. Inter-arrival
gaps are gamma-distributed with shape = burstiness and mean = 1 / rate, as in
`vllm bench serve`: burstiness 1 is a Poisson process (exponential gaps, coefficient of
variation 1); below 1 the arrivals are burstier (CV = 1 / sqrt(burstiness)); above 1 they
are more even. An infinite rate sends everything at t = 0.

Closed loop (`ClosedLoop`): a fixed number of users, each sending its next request as soon
as the previous one ends; the server's speed sets the rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OpenLoop:
    rate: float  # requests per second; math.inf sends every request at once
    burstiness: float = 1.0  # gamma shape: 1 = Poisson, < 1 burstier, > 1 smoother

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"request rate must be > 0, got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a positive number, got {self.burstiness}")

    def gaps(self, rng: np.random.Generator) -> Iterator[float]:
        """Seconds between consecutive arrivals, forever."""
        if math.isinf(self.rate):
            while True:
                yield 0.0
        scale = 1.0 / (self.rate * self.burstiness)  # mean gap = shape * scale = 1 / rate
        while True:
            yield float(rng.gamma(self.burstiness, scale))

    def send_times(self, rng: np.random.Generator) -> Iterator[float]:
        """Arrival times in seconds from the start; the first request goes at 0."""
        now = 0.0
        for gap in self.gaps(rng):
            yield now
            now += gap

    def describe(self) -> str:
        kind = "Poisson" if self.burstiness == 1.0 else f"gamma, burstiness {self.burstiness:g}"
        return f"open loop, {self.rate:g} req/s ({kind})"


@dataclass(frozen=True)
class ClosedLoop:
    concurrency: int  # requests in flight at all times

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")

    def describe(self) -> str:
        return f"closed loop, {self.concurrency} concurrent"


LoadShape = OpenLoop | ClosedLoop
