"""Stopping a service within a bound, even when NATS (or a peer) is unreachable.

Every await on the way out goes through `bounded`: a step that hangs (a NATS drain
against a server that is gone, a subscription that cannot be removed) is given up on
after its share of the grace period, so a service told to stop always exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable
from typing import NoReturn

import structlog

log = structlog.get_logger()

DEFAULT_DRAIN_TIMEOUT_S = 30.0
STEP_TIMEOUT_S = 5.0  # one shutdown step (admin stop, unsubscribe, NATS close)


async def bounded(step: Awaitable, what: str, seconds: float = STEP_TIMEOUT_S) -> bool:
    """Awaits `step` for at most `seconds`; True if it finished, False (logged) otherwise."""
    try:
        await asyncio.wait_for(step, seconds)
        return True
    except TimeoutError:
        log.warning("shutdown_step_timed_out", step=what, seconds=seconds)
    except Exception as exc:  # stopping anyway: a failed step must not keep the process alive
        log.warning("shutdown_step_failed", step=what, error=repr(exc))
    return False


def exit_without_teardown(code: int) -> NoReturn:
    """Ends a service process once everything it holds is closed.

    Skips the interpreter's teardown, which spends seconds garbage-collecting a model-sized
    heap (6 s measured for a tiny-llama worker on this box) while the stack waits to stop.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


async def wait_for_either(*events: asyncio.Event) -> None:
    """Returns as soon as one of `events` is set."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
