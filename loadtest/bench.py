"""One benchmark run, end to end: plan → schedule → warm-up → run → summary → result dict.

`pdserve bench serve` is this plus printing and files; `pdserve bench compare` calls it
once per mode with the same plan, hence the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loadtest import runner, schedule
from loadtest.arrivals import ClosedLoop, LoadShape, OpenLoop
from loadtest.client import Endpoint, Target
from loadtest.metrics import SLO, summarize
from loadtest.progress import Progress
from loadtest.prompts import PromptSource
from loadtest.report import json_number, result_json
from loadtest.runner import Limits
from loadtest.workloads import Trace, Workload


@dataclass(frozen=True)
class Plan:
    """What to send and when: identical plans give identical schedules."""

    workload: Workload
    load: LoadShape
    limits: Limits
    seed: int = 0

    @property
    def replays_trace_times(self) -> bool:
        return isinstance(self.workload, Trace) and isinstance(self.load, OpenLoop)

    def describe_load(self) -> str:
        if self.replays_trace_times:
            return f"trace send times, speedup {self.workload.speedup:g}x"
        return self.load.describe()

    def expected_requests(self) -> int | None:
        counts = [self.limits.num_requests]
        if isinstance(self.workload, Trace):
            counts.append(len(self.workload.records))
        return min((c for c in counts if c is not None), default=None)


@dataclass(frozen=True)
class Reporting:
    workers: int = 1  # divisor for the per-worker throughputs
    slo: SLO = field(default_factory=SLO)
    progress: bool = True
    tokenizer_id: str = ""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")


def _info(target: Target, plan: Plan, reporting: Reporting, num_sent: int) -> dict:
    load = plan.load
    open_loop = isinstance(load, OpenLoop) and not plan.replays_trace_times
    return {
        "model_id": target.model,
        "tokenizer_id": reporting.tokenizer_id or target.model,
        "base_url": target.base_url,
        "endpoint": target.endpoint.path,
        "workload": plan.workload.name,
        "load": plan.describe_load(),
        "num_prompts": num_sent,
        "request_rate": json_number(load.rate) if open_loop else None,
        "burstiness": load.burstiness if open_loop else None,
        "max_concurrency": load.concurrency if isinstance(load, ClosedLoop) else None,
        "duration_limit": plan.limits.duration_s,
        "seed": plan.seed,
        "goodput_slos": reporting.slo.as_dict(),
    }


async def run_bench(target: Target, plan: Plan, source: PromptSource, reporting: Reporting = Reporting(), warmup: bool = True) -> dict:
    """Runs the plan against the target and returns the result dict (see report.py)."""
    as_text = target.endpoint is Endpoint.CHAT
    if warmup:
        first = next(schedule.build(plan.workload, plan.load, source, plan.seed, as_text))
        await runner.warm_up(target, first)
    specs = schedule.build(plan.workload, plan.load, source, plan.seed, as_text)
    progress = Progress(plan.expected_requests(), plan.limits.duration_s, enabled=reporting.progress)
    run = await runner.run(specs, target, plan.load, plan.limits, progress)
    if not run.outcomes:
        raise ValueError("no request was sent (is the duration shorter than the first arrival?)")
    summary = summarize(run.outcomes, max(run.duration_s, 1e-9), reporting.workers, reporting.slo)
    return result_json(_info(target, plan, reporting, len(run.outcomes)), run, summary)


def open_or_closed(request_rate: float, burstiness: float, concurrency: int | None) -> LoadShape:
    """Closed loop when a concurrency is given, open loop at the rate otherwise."""
    if concurrency is not None:
        return ClosedLoop(concurrency)
    return OpenLoop(request_rate, burstiness)

