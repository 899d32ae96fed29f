"""Where a model load is, as `load_progress` log events (stage, done, total), so `pdserve up`
can show each worker's progress (services/startup_progress.py reads them from the log).

Throttled: at most a few events a second per stage, plus its first and last step.
"""

from __future__ import annotations

import time

import structlog

log = structlog.get_logger()

MIN_INTERVAL_S = 0.25
_last: dict[str, float] = {}


def report(stage: str, done: int = 0, total: int = 0) -> None:
    now = time.monotonic()
    edge = done in (0, 1) or done >= total
    if not edge and now - _last.get(stage, 0.0) < MIN_INTERVAL_S:
        return
    _last[stage] = now
    log.info("load_progress", stage=stage, done=done, total=total)
