"""How much pooled instances lose to placement on stale load: the study behind docs/planner.md's
"Pooling: the scheduler herded onto the freshest heartbeat".

The same pool is simulated several ways at each rate: as pdserve places (heartbeats, the
scheduler's own placements since, prefill backlogs drained at the reported rate); with every
worker's load seen as it is at each placement (each worker beats just before it, the best
any load report can do); for colocated, one instance alone at its share of the rate (no
pooling at all); for disaggregated, with only the prefill or only the decode pool's load
seen fresh (which pool's staleness costs what). Printed: SLO attainment (P99 TTFT) per rate, and goodput (the
highest rate with >= 90% attainment, by bisection).

    python -m planner.herding --mode colocated --rates 150 250 300 350
    python -m planner.herding --mode disagg --rates 150 200 250
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from loadtest.workloads import fixed
from planner.deployment import Deployment, Pool
from planner.hardware import H100_HGX8
from planner.metrics import ATTAINMENT, Slo, Summary, summarize
from planner.model_spec import load_model_spec
from planner.plan import default_slo
from planner.simulator import Arrival, SimConfig, Simulation
from planner.workload import RequestSource
from services.scheduler.policy import Mode
from shared.layouts import DecoderLayout, PrefillLayout
from shared.protocol import Role

MODEL = load_model_spec("llama-3.1-8b")
REQUESTS, WARMUP = 3000, 1000
GOODPUT_PRECISION = 2.0  # req/s: the bisection stops when the bracket is this narrow


def colocated(count: int) -> Deployment:
    return Deployment(Mode.COLOCATED, (Pool(Role.BOTH, DecoderLayout(tp=1), count, 512),))


def disagg(prefill: int, decode: int) -> Deployment:
    return Deployment(Mode.DISAGG, (Pool(Role.PREFILL, PrefillLayout(tp=1), prefill, 2048), Pool(Role.DECODE, DecoderLayout(tp=1), decode)))


ALL_ROLES = frozenset(Role)


class FreshLoadSimulation(Simulation):
    """Placement sees the load of the workers of `roles` as it is: each beats just before every placement."""

    def __init__(self, config: SimConfig, roles: frozenset[Role] = ALL_ROLES):
        super().__init__(config)
        self.fresh_roles = roles

    def _arrive(self, req, version):
        for worker in self.workers.values():
            if worker.role in self.fresh_roles:
                self.registry.observe(worker.heartbeat(self.now))
        super()._arrive(req, version)


@dataclasses.dataclass(frozen=True)
class Study:
    input_len: int
    output_len: int

    @property
    def slo(self) -> Slo:
        return default_slo(MODEL, H100_HGX8, RequestSource(fixed(self.input_len, self.output_len)), 8)

    def arrivals(self, rate: float, seed: int = 0) -> list[Arrival]:
        """Poisson times, drawn as tests/planner/test_simulator.py draws them."""
        gaps = np.random.default_rng(seed).exponential(1 / rate, REQUESTS)
        return [Arrival(float(t), self.input_len, self.output_len) for t in np.cumsum(gaps)]

    def run(self, deployment: Deployment, rate: float, fresh: frozenset[Role] = frozenset()) -> Summary:
        """`fresh`: the roles whose load placement sees as it is (none: as pdserve places)."""
        config = dataclasses.replace(SimConfig(deployment, MODEL, H100_HGX8), warmup=WARMUP)
        simulation = FreshLoadSimulation(config, fresh) if fresh else Simulation(config)
        return summarize(simulation.run(self.arrivals(rate)), self.slo)


def goodput(attained, low: float, high: float) -> float:
    """The highest rate in [low, high) at which `attained(rate)` holds, by bisection (low must hold, high not)."""
    while high - low > GOODPUT_PRECISION:
        mid = (low + high) / 2
        low, high = (mid, high) if attained(mid) else (low, mid)
    return low


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m planner.herding", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["colocated", "disagg"], default="colocated")
    parser.add_argument("--rates", type=float, nargs="+", default=[150, 250, 300, 350])
    parser.add_argument("--goodput-range", type=float, nargs=2, default=[100, 600], metavar=("LOW", "HIGH"))
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    args = parser.parse_args(argv)
    study = Study(args.input_len, args.output_len)
    slo = study.slo
    pool = colocated(8) if args.mode == "colocated" else disagg(3, 5)
    ways = {"as placed": lambda rate: study.run(pool, rate), "fresh load": lambda rate: study.run(pool, rate, ALL_ROLES)}
    if args.mode == "colocated":
        ways["one alone at 1/8"] = lambda rate: study.run(colocated(1), rate / 8)
    else:  # which pool's stale load costs what
        ways["fresh prefill load only"] = lambda rate: study.run(pool, rate, frozenset({Role.PREFILL}))
        ways["fresh decode load only"] = lambda rate: study.run(pool, rate, frozenset({Role.DECODE}))
    print(f"{pool.describe()}; {study.input_len}/{study.output_len} tokens; SLOs TTFT {slo.ttft_ms} ms, TPOT {slo.tpot_ms} ms;"
          f" {REQUESTS} requests, {WARMUP} warm-up")
    print("rate | " + " | ".join(ways))
    for rate in args.rates:
        cells = []
        for way in ways.values():
            summary = way(rate)
            cells.append(f"{100 * summary.attainment:.1f}% ({summary.p99_ttft_ms:.0f} ms)")
        print(f"{rate:g} | " + " | ".join(cells))
    low, high = args.goodput_range
    for name, way in ways.items():
        print(f"goodput, {name}: {goodput(lambda rate: way(rate).attainment >= ATTAINMENT, low, high):.0f} req/s")


if __name__ == "__main__":
    main()
