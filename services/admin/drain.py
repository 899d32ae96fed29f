"""`pdserve admin drain`: ask workers to drain, then follow each until it has left.

The worker does the draining (stop taking work, finish what it holds, exit). Admin polls
its `status` every second: `requests` (its request table's size) is the progress, and
"no responders" means the worker has exited, i.e. drained. Past `--wait` seconds admin
stops following and says how many requests were still running (the worker keeps draining).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum

from services.admin.client import AdminCallError, AdminSession

POLL_S = 1.0



class DrainOutcome(StrEnum):
    DRAINED = "drained"  # finished its requests and exited
    TIMED_OUT = "timed_out"  # still running requests when --wait ran out
    DRAINING = "draining"  # --wait 0: asked, not followed
    FAILED = "failed"  # the drain request itself failed


@dataclass
class DrainReport:
    worker_id: str
    outcome: DrainOutcome = DrainOutcome.DRAINING
    requests_at_start: int | None = None
    requests_left: int | None = None
    seconds: float = 0.0
    message: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def requests_held(status: dict) -> int:
    """Requests in the worker's request table, any phase."""
    return status["requests"]


def plural(count: int) -> str:
    return f"{count} request" + ("" if count == 1 else "s")


def progress_line(report: DrainReport) -> str:
    return f"{report.worker_id} draining: {plural(report.requests_left or 0)} left after {report.seconds:.1f} s"


def final_line(report: DrainReport) -> str:
    match report.outcome:
        case DrainOutcome.DRAINED:
            return f"{report.worker_id} drained: finished {plural(report.requests_at_start or 0)} in {report.seconds:.1f} s"
        case DrainOutcome.TIMED_OUT:
            return (
                f"{report.worker_id}: timed out after {report.seconds:.1f} s with {plural(report.requests_left or 0)} "
                "still running (the worker keeps draining)"
            )
        case DrainOutcome.DRAINING:
            return f"{report.worker_id} draining ({plural(report.requests_at_start or 0)} in flight); not waiting for it"
        case _:
            return report.message


async def drain_worker(session: AdminSession, worker_id: str, wait_s: float, on_progress: Callable[[DrainReport], None]) -> DrainReport:
    report = DrainReport(worker_id)
    started = time.monotonic()
    try:
        await session.call(worker_id, "drain")
    except AdminCallError as exc:
        return _ended(report, DrainOutcome.FAILED, started, f"{worker_id}: drain failed: {exc}")
    deadline = started + wait_s
    while True:
        try:
            status = await session.call(worker_id, "status", timeout=min(session.timeout, 2 * POLL_S))
        except AdminCallError as exc:
            if exc.gone:  # its admin endpoints are gone: it finished and exited
                return _ended(report, DrainOutcome.DRAINED, started)
            status = None  # busy for a moment: ask again
        if status is not None and not status.get("draining", True):
            return _ended(report, DrainOutcome.DRAINED, started)  # a new process took its id (a supervisor restarted it)
        if status is not None:
            report.requests_left = requests_held(status)
            if report.requests_at_start is None:
                report.requests_at_start = report.requests_left
        if wait_s <= 0:
            return _ended(report, DrainOutcome.DRAINING, started)
        if time.monotonic() >= deadline:
            return _ended(report, DrainOutcome.TIMED_OUT, started)
        report.seconds = time.monotonic() - started
        if status is not None:
            on_progress(report)
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def _ended(report: DrainReport, outcome: DrainOutcome, started: float, message: str = "") -> DrainReport:
    report.outcome = outcome
    if outcome is DrainOutcome.DRAINED:
        report.requests_left = 0
        report.requests_at_start = report.requests_at_start or 0
    report.seconds = round(time.monotonic() - started, 2)
    report.message = message or final_line(report)
    return report
