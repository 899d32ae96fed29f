"""A worker's SIGTERM: the admin `drain` behaviour, bounded by `--drain-timeout`.

The worker leaves placement at once (its heartbeat says draining), finishes what it holds,
and exits. Whatever is still running when the timeout passes is ended with an error event
marked UNAVAILABLE (so the gateway migrates it to another worker, or ends it with a 503
and `[DONE]`) and released here.
"""

from __future__ import annotations

import asyncio

import structlog

from services.worker.service import WorkerService
from shared import protocol
from shared.protocol import ErrorCode, FinishReason, TokenEvent

log = structlog.get_logger()


async def wait_for_either(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def drain_on_signal(service: WorkerService, drained: asyncio.Event, timeout_s: float) -> None:
    log.info("worker_draining_on_signal", timeout_s=timeout_s)
    await service.drain()
    try:
        await asyncio.wait_for(drained.wait(), timeout_s)
    except TimeoutError:
        ended = await end_leftovers(service, f"worker {service.ctx.worker_id} shut down before the request finished")
        log.warning("worker_drain_timed_out", ended=ended)


async def end_leftovers(service: WorkerService, why: str) -> int:
    """Tells each request's gateway it ended here (UNAVAILABLE), then releases it; returns how many."""
    ctx = service.ctx
    subjects = {request_id: job.stream_subject for request_id, job in ctx.prefills.items()}
    for request_id in ctx.streams.request_ids():
        subjects[request_id] = ctx.streams.close(request_id).subject
    for request_id, subject in subjects.items():
        event = TokenEvent(request_id, ctx.worker_id, [], FinishReason.ERROR, why, error_code=ErrorCode.UNAVAILABLE)
        try:
            await ctx.nc.publish(subject, protocol.encode(event))
        except Exception as exc:  # NATS gone: the gateway learns from the missing heartbeats instead
            log.warning("leftover_not_told", request_id=request_id, error=repr(exc))
        await service.cancel(request_id)
    return len(subjects)
