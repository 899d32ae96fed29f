"""Drives a schedule against a target: open loop on the schedule's clock, or closed loop.

Life of a run: optional warm-up request (not measured; a failure aborts the run, since the
endpoint is then likely wrong) → clock starts → requests are sent until the request count
is reached, the schedule (a trace) runs out, or the duration has passed → requests already
in flight finish, each bounded by its timeout, so their latency is not censored → clock
stops. The run always ends: at most duration + per-request timeout after it began.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import aiohttp

from loadtest import client
from loadtest.arrivals import ClosedLoop, LoadShape, OpenLoop
from loadtest.client import RequestOutcome, Target
from loadtest.progress import Progress
from loadtest.schedule import RequestSpec


@dataclass(frozen=True)
class Limits:
    num_requests: int | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give a request count, a duration, or both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"request count must be at least 1, got {self.num_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be > 0, got {self.duration_s}")


@dataclass(frozen=True)
class RunResult:
    outcomes: list[RequestOutcome]  # in schedule order
    duration_s: float  # first send to last completion


class WarmupFailed(RuntimeError):
    pass


def _session() -> aiohttp.ClientSession:
    # No connection cap: an open-loop run must never queue on the client side.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None))


async def warm_up(target: Target, spec: RequestSpec) -> RequestOutcome:
    async with _session() as session:
        outcome = await client.send(session, target, spec, time.perf_counter())
    if not outcome.success:
        raise WarmupFailed(f"warm-up request to {target.url} failed: {outcome.error}")
    return outcome


async def run(schedule: Iterable[RequestSpec], target: Target, load: LoadShape, limits: Limits, progress: Progress | None = None) -> RunResult:
    specs = iter(schedule)
    if limits.num_requests is not None:
        specs = itertools.islice(specs, limits.num_requests)
    progress = progress or Progress(limits.num_requests, limits.duration_s, enabled=False)
    async with _session() as session:
        start = time.perf_counter()

        async def one(spec: RequestSpec) -> RequestOutcome:
            progress.started()
            outcome = await client.send(session, target, spec, start)
            progress.finished(outcome.success)
            return outcome

        if isinstance(load, OpenLoop):
            outcomes = await _open_loop(specs, one, start, limits.duration_s)
        else:
            outcomes = await _closed_loop(specs, one, load, start, limits.duration_s)
        duration = time.perf_counter() - start
    progress.close()
    return RunResult(sorted(outcomes, key=lambda o: o.index), duration)


async def _open_loop(specs: Iterator[RequestSpec], one, start: float, duration_s: float | None) -> list[RequestOutcome]:
    tasks = []
    for spec in specs:
        if duration_s is not None and spec.send_at > duration_s:
            break
        delay = start + spec.send_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(spec)))
    return list(await asyncio.gather(*tasks))


async def _closed_loop(specs: Iterator[RequestSpec], one, load: ClosedLoop, start: float, duration_s: float | None) -> list[RequestOutcome]:
    outcomes: list[RequestOutcome] = []

    async def user() -> None:
        for spec in specs:  # shared iterator: each spec goes to exactly one user
            if duration_s is not None and time.perf_counter() - start > duration_s:
                return
            outcomes.append(await one(spec))

    await asyncio.gather(*(user() for _ in range(load.concurrency)))
    return outcomes
