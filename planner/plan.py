"""A whole planning run: best deployment per mode, both at one load, the recommendation, the curves.

1. For each mode, search its deployments for the highest goodput (search.py).
2. Compare the winners at one load: the request rate given, else the *production load*,
   70% of the colocated winner's goodput (of the first mode's, without colocated): a
   busy deployment with headroom, where tails show but nothing is saturated. The load
   uses the bench's arrival shape (Poisson or `--burstiness`, `--concurrency` closed
   loop, a trace's own times) and `--num-requests`.
3. Recommend disaggregation when its goodput per device beats colocated's by at least
   `RECOMMEND_MARGIN` (a second pool and a KV hand-off are not free to run); else colocated.
4. TTFT and TPOT against request rate for each winner (the PNG).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from loadtest.arrivals import ClosedLoop, OpenLoop
from loadtest.workloads import Trace
from planner.capacity import prefill_seconds
from planner.cost_model import CostModel, decode_batch
from planner.deployment import Deployment, candidate_layouts
from planner.hardware import Hardware
from planner.metrics import Slo, Summary
from planner.model_spec import ModelSpec
from planner.scenario import Scenario
from planner.search import Evaluated, best, colocated_candidates, disagg_candidates
from planner.workload import RequestSource
from services.scheduler.policy import Mode
from shared.layouts import Layout
from shared.protocol import Role

PRODUCTION_LOAD = 0.7  # of the colocated deployment's goodput
RECOMMEND_MARGIN = 0.05  # disaggregation must win goodput per device by this much
CURVE_LOW_POINTS = (0.3, 0.6)  # curve points below the goodput probes, as fractions of the goodput
DEFAULT_SLO_FACTOR = 5.0  # default SLOs: this many times what one request alone sees


@dataclass(frozen=True)
class Load:
    """The load both winners are compared at.

    Steady state (default): `num_requests` measured after a warm-up, on the deployment's
    smallest unit (search.Scenario.steady). Exact (`exact`, as `pdserve bench` runs it, e.g.
    to check against a measured run): the bench's schedule of exactly `num_requests`
    requests from an empty system, closed loop or a trace's own times included.
    """

    rate: float | None = None  # requests/s; None: the production load
    concurrency: int | None = None  # closed loop instead
    num_requests: int = 600
    duration_s: float | None = None
    replay_trace: bool = False  # a trace without a rate: its own send times
    exact: bool = False

    def __post_init__(self) -> None:
        if (self.concurrency is not None or self.replay_trace or self.duration_s is not None) and not self.exact:
            object.__setattr__(self, "exact", True)  # only a bench-shaped run has these


@dataclass(frozen=True)
class Fixed:
    """What the user pinned instead of searching."""

    colocated_layout: Layout | None = None
    prefill_layout: Layout | None = None
    decode_layout: Layout | None = None
    split: tuple[int, int] | None = None  # (prefill devices, decode devices)


@dataclass
class ModeOutcome:
    mode: Mode
    winner: Evaluated
    simulated: list[Evaluated]
    at_load: Summary
    curve: list[tuple[float, Summary]] = field(default_factory=list)


@dataclass
class PlanOutcome:
    scenario: Scenario
    modes: dict[Mode, ModeOutcome]
    load_rate: float | None
    load_text: str
    recommendation: Mode


def default_slo(model: ModelSpec, hardware: Hardware, source: RequestSource, devices: int) -> Slo:
    """TTFT and TPOT `DEFAULT_SLO_FACTOR` times those of one request alone on the smallest instance that fits.

    Alone: the mean prompt prefilled in one step, then decoded at batch 1 over the mean context.
    """
    layouts = candidate_layouts(model, hardware, Role.BOTH, devices, source.max_request_tokens())
    if not layouts:
        raise ValueError(f"{model.name} does not fit {devices} x {hardware.name}: give more --devices")
    mean_in, mean_out = source.mean_lengths()
    cost = CostModel(model, hardware, layouts[0])
    ttft = prefill_seconds(cost, int(mean_in), int(mean_in)) + hardware.efficiency.request_overhead_s
    tpot = cost.step_time(decode_batch(1, int(mean_in + mean_out / 2)))
    return Slo(round(DEFAULT_SLO_FACTOR * ttft * 1000, 3), round(DEFAULT_SLO_FACTOR * tpot * 1000, 3))


def _candidates(scenario: Scenario, mode: Mode, fixed: Fixed) -> list[Deployment]:
    if mode is Mode.COLOCATED:
        return colocated_candidates(scenario, [fixed.colocated_layout] if fixed.colocated_layout else None)
    prefill = [fixed.prefill_layout] if fixed.prefill_layout else None
    decode = [fixed.decode_layout] if fixed.decode_layout else None
    return disagg_candidates(scenario, prefill, decode, fixed.split)


def _load_text(load: Load, rate: float | None, source_name: str, chosen: bool) -> str:
    if load.concurrency is not None:
        return f"closed loop, {load.concurrency} concurrent"
    if load.replay_trace:
        return f"trace {source_name}, its own send times"
    why = f" ({PRODUCTION_LOAD:.0%} of the colocated goodput)" if chosen else ""
    return f"open loop, {rate:.3g} req/s{why}"


def _arrivals_at_load(scenario: Scenario, load: Load, rate: float | None):
    source = scenario.source
    if load.concurrency is not None:
        return source.shaped(ClosedLoop(load.concurrency), load.num_requests, load.duration_s)
    if load.replay_trace and isinstance(source.workload, Trace):
        return source.shaped(OpenLoop(1.0), load.num_requests, load.duration_s)
    return source.shaped(OpenLoop(rate, source.burstiness), load.num_requests, load.duration_s)


def plan(scenario: Scenario, modes: list[Mode], load: Load, fixed: Fixed = Fixed(), top_k: int = 2,
         curve: bool = True, progress: Callable[[str], None] = lambda _: None) -> PlanOutcome:
    winners: dict[Mode, tuple[Evaluated, list[Evaluated]]] = {}
    for mode in modes:
        winners[mode] = best(scenario, _candidates(scenario, mode, fixed), top_k, progress)
    reference = winners.get(Mode.COLOCATED, winners[modes[0]])[0]
    chosen = load.rate is None and load.concurrency is None and not load.replay_trace
    rate = PRODUCTION_LOAD * reference.goodput.rate if chosen else load.rate
    if chosen and rate <= 0:
        raise ValueError("the colocated deployment meets the SLOs at no request rate; loosen --slo or add --devices")
    outcomes = {}
    for mode, (winner, simulated) in winners.items():
        progress(f"{mode.value} at the load")
        if load.exact:
            at_load = scenario.run(winner.deployment, _arrivals_at_load(scenario, load, rate), load.concurrency)
        else:
            at_load = scenario.steady(winner.deployment, rate, load.num_requests)
        outcomes[mode] = ModeOutcome(mode, winner, simulated, at_load)
    if curve:
        for mode, outcome in outcomes.items():
            progress(f"{mode.value} curve")
            outcome.curve = _curve(scenario, outcome.winner)
    return PlanOutcome(scenario, outcomes, rate, _load_text(load, rate, scenario.source.name, chosen), recommend(outcomes))


def _curve(scenario: Scenario, winner: Evaluated) -> list[tuple[float, Summary]]:
    """The goodput search's own probes (around the goodput) plus a few lighter loads."""
    rate = winner.goodput.rate or min(r for r, _ in winner.goodput.probes)
    low = [(f * rate, scenario.steady(winner.deployment, f * rate, scenario.search_requests)) for f in CURVE_LOW_POINTS]
    return sorted(low + list(winner.goodput.probes), key=lambda point: point[0])


def recommend(outcomes: dict[Mode, ModeOutcome]) -> Mode:
    if Mode.DISAGG not in outcomes or Mode.COLOCATED not in outcomes:
        return next(iter(outcomes))
    disagg = outcomes[Mode.DISAGG].winner.per_device
    colocated = outcomes[Mode.COLOCATED].winner.per_device
    return Mode.DISAGG if disagg >= colocated * (1 + RECOMMEND_MARGIN) and disagg > 0 else Mode.COLOCATED

