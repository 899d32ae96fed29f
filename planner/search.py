"""Which deployment serves best: layouts and prefill:decode splits, ranked, then goodput found by simulation.

Goodput of a deployment: the highest request rate at which at least `ATTAINMENT` (90%) of
requests meet both SLOs (DistServe's definition), found over steady-state simulations
(scenario.py) of `search_requests` measured requests each, starting from the closed-form
capacity (capacity.py): stepping by `BRACKET` until it is bracketed, then bisecting.

Candidates are whole units repeated as often as the devices allow (leftover devices stay
idle; per-device numbers divide by the devices used):
- colocated: one instance of every fitting `both` layout and step budget;
- disaggregated: p prefill and d decode instances, p, d <= `MAX_UNIT` and coprime, for
  every fitting (prefill layout, step budget, decode layout); `--split` pins the devices.
All are ranked by closed-form capacity; the best `top_k` of each mode (one per limiting
pool, and only those within 10% of the best's capacity) are simulated, and the one with
the highest goodput wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from planner.capacity import instance_capacity
from planner.deployment import Deployment, Pool, candidate_layouts
from planner.metrics import ATTAINMENT, Summary
from planner.scenario import Scenario
from services.scheduler.policy import Mode
from shared.layouts import Layout
from shared.protocol import Role

BRACKET = 1.15  # the goodput search steps up or down by this factor until it brackets the goodput
MAX_BRACKET_STEPS = 8
REFINE_STEPS = 2  # bisections of the bracket: the goodput within 15% / 4 ~ 4%
MAX_UNIT = 8  # instances of one role in a disaggregated unit
WARMUP_MARGIN = 1.5  # a probe warms up for this many times the time in system the last good probe measured
CLOSE_ENOUGH = 0.9  # a runner-up is simulated only if its closed-form capacity is within 10% of the best's


@dataclass(frozen=True)
class Goodput:
    rate: float  # requests/s of the whole deployment
    probes: tuple[tuple[float, Summary], ...]  # (rate, steady-state summary) of every probe, by rate


@dataclass(frozen=True)
class Evaluated:
    deployment: Deployment
    capacity: float
    goodput: Goodput

    @property
    def per_device(self) -> float:
        return self.goodput.rate / self.deployment.devices


def goodput(scenario: Scenario, deployment: Deployment, estimate: float) -> Goodput:
    probes: list[tuple[float, Summary]] = []
    lifetime = [scenario.slo_lifetime_s]  # how long requests stayed in the last probe that met the SLOs

    def good(rate: float) -> bool:
        summary = scenario.steady(deployment, rate, scenario.search_requests, lifetime[0])
        probes.append((rate, summary))
        met = (summary.attainment or 0.0) >= ATTAINMENT
        if met and summary.mean_e2el_ms:
            lifetime[0] = WARMUP_MARGIN * summary.mean_e2el_ms / 1000
        return met

    rate = max(estimate, 1e-6)
    low, high = 0.0, None  # highest rate known good, lowest known bad
    for _ in range(MAX_BRACKET_STEPS):
        if good(rate):
            low = rate
            if high is not None:
                break
            rate *= BRACKET
        else:
            high = rate
            if low > 0:
                break
            far = (probes[-1][1].attainment or 0.0) < ATTAINMENT / 2  # far off: take a longer step down
            rate /= BRACKET**3 if far else BRACKET
    if high is not None and low > 0:
        for _ in range(REFINE_STEPS):
            mid = (low + high) / 2
            low, high = (mid, high) if good(mid) else (low, mid)
    return Goodput(low, tuple(sorted(probes, key=lambda p: p[0])))


def colocated_candidates(scenario: Scenario, layouts: list[Layout] | None = None) -> list[Deployment]:
    s = scenario
    layouts = layouts or candidate_layouts(s.model, s.hardware, Role.BOTH, s.devices, s.max_request_tokens)
    return [Deployment(Mode.COLOCATED, (Pool(Role.BOTH, lay, s.devices // lay.world, budget),))
            for lay in layouts if lay.world <= s.devices for budget in s.budgets(Role.BOTH)]


def disagg_candidates(scenario: Scenario, prefill: list[Layout] | None = None, decode: list[Layout] | None = None,
                      split: tuple[int, int] | None = None) -> list[Deployment]:
    """Units of p prefill + d decode instances, repeated; `split` = (prefill devices, decode devices) pins them."""
    s = scenario
    prefill = prefill or candidate_layouts(s.model, s.hardware, Role.PREFILL, s.devices - 1, s.max_request_tokens)
    decode = decode or candidate_layouts(s.model, s.hardware, Role.DECODE, s.devices - 1, s.max_request_tokens)
    decode_budget = s.budgets(Role.DECODE)[0]
    out = []
    for lp in prefill:
        for budget in s.budgets(Role.PREFILL):
            for ld in decode:
                for p, d in _counts(s.devices, lp.world, ld.world, split):
                    out.append(Deployment(Mode.DISAGG, (Pool(Role.PREFILL, lp, p, budget), Pool(Role.DECODE, ld, d, decode_budget))))
    return out


def _counts(devices: int, prefill_world: int, decode_world: int, split: tuple[int, int] | None) -> list[tuple[int, int]]:
    """(prefill instances, decode instances): every unit repeated to fill the devices, or the split's."""
    if split is not None:
        fits = split[0] % prefill_world == 0 and split[1] % decode_world == 0
        return [(split[0] // prefill_world, split[1] // decode_world)] if fits else []
    out = []
    for p in range(1, MAX_UNIT + 1):
        for d in range(1, MAX_UNIT + 1):
            copies = devices // (p * prefill_world + d * decode_world)
            if math.gcd(p, d) == 1 and copies:
                out.append((p * copies, d * copies))
    return out


@dataclass(frozen=True)
class Ranked:
    capacity: float  # requests/s, closed form
    deployment: Deployment
    bottleneck: Pool  # the pool that limits the capacity


def rank(scenario: Scenario, candidates: list[Deployment]) -> list[Ranked]:
    """Best capacity first (fewer devices on ties); instance capacities computed once per pool shape."""
    request = scenario.mean_request()
    cache: dict[tuple, float] = {}

    def pool_capacity(pool: Pool, mode: Mode) -> float:
        key = (pool.layout, pool.role, pool.step_tokens)
        if key not in cache:
            cache[key] = instance_capacity(scenario.model, scenario.hardware_for(mode), pool, request)
        return pool.count * cache[key]

    ranked = []
    for deployment in candidates:
        capacity, bottleneck = min(((pool_capacity(p, deployment.mode), p) for p in deployment.pools), key=lambda item: item[0])
        ranked.append(Ranked(capacity, deployment, bottleneck))
    return sorted(ranked, key=lambda r: (-r.capacity, r.deployment.devices))


def distinct_bottlenecks(ranked: list[Ranked]) -> list[Ranked]:
    """Drops a disaggregated candidate whose limiting pool and device count equal a better-ranked
    one's: it differs only in headroom in the other pool, so it would simulate to the same goodput."""
    seen, kept = set(), []
    for r in ranked:
        key = (r.bottleneck, r.deployment.devices) if r.deployment.mode is Mode.DISAGG else r.deployment
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def best(scenario: Scenario, candidates: list[Deployment], top_k: int,
         progress: Callable[[str], None] = lambda _: None) -> tuple[Evaluated, list[Evaluated]]:
    """The candidate with the highest simulated goodput among the `top_k` best ranked; and all simulated."""
    if not candidates:
        raise ValueError("no deployment fits: the model's weights and one request's KV exceed the devices given")
    evaluated = []
    ranked = distinct_bottlenecks(rank(scenario, candidates))
    for r in [r for r in ranked[:top_k] if r.capacity >= CLOSE_ENOUGH * ranked[0].capacity]:
        progress(f"goodput of {r.deployment.describe()}")
        evaluated.append(Evaluated(r.deployment, r.capacity, goodput(scenario, r.deployment, r.capacity)))
    winner = max(evaluated, key=lambda e: (e.goodput.rate, -e.deployment.devices))
    return winner, evaluated
