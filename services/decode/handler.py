"""Decode worker: pulls a prefilled request's KV (re-sharded to its layout) and continues it.

Life cycle of a DecodeJob (phases of the request table, services/worker/requests.py):
  offer arrives over NATS -> refused if this worker cannot take it (draining, queue full,
  over budget, cancelled) or if the session does not fit (model, layers, heads, head_dim,
  dtype, layout: the refusal names the field) -> every rank posts its receives,
  SessionAccepted replied with every rank's address -> AWAITING_KV until every rank's
  buffers arrived over UCX (within the lease, else released) -> pages reserved, each rank
  scatters its buffers straight into them -> DECODING from token N+1 -> tokens streamed to
  the gateway until a stop condition, then released (pages freed).
A refused, failed or expired transfer writes nothing into any cache; its end is a 503-class
error the gateway may retry elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import msgspec
import structlog

from services.worker.context import WorkerContext, engine_sampling
from services.worker.requests import Ending, Phase, WorkerRequest
from shared import protocol
from shared.engine.engine import KvCacheFullError
from shared.protocol import DecodeJob, ErrorCode, Path, ServiceError, SessionAccepted

log = structlog.get_logger()

_job_decoder = protocol.decoder(DecodeJob)

KV_ROOM_POLL_S = 0.02

Release = Callable[[str, Ending], Awaitable[bool]]


class DecodeHandler:
    def __init__(self, ctx: WorkerContext, release: Release):
        self.ctx = ctx
        self.release = release
        self._tasks: set[asyncio.Task] = set()

    def _refusal(self, job: DecodeJob) -> ServiceError | None:
        ctx = self.ctx
        if job.request_id in ctx.cancelled:
            ctx.cancelled.discard(job.request_id)
            return ServiceError(ErrorCode.BAD_REQUEST, "request was cancelled")
        if job.request_id in ctx.requests:
            return ServiceError(ErrorCode.BAD_REQUEST, f"request {job.request_id!r} is already on {ctx.worker_id}")
        if not ctx.engine_loop.engine.fits_budget(job.num_prompt_tokens + job.sampling.max_tokens):
            return ServiceError(ErrorCode.BAD_REQUEST, "request does not fit this decoder's KV budget")
        return ctx.refusal()

    async def on_job(self, msg) -> None:
        try:
            job = _job_decoder.decode(msg.data)
        except (msgspec.DecodeError, ValueError) as exc:
            await msg.respond(protocol.encode(ServiceError(ErrorCode.BAD_REQUEST, f"malformed decode job: {exc}")))
            return
        refusal = self._refusal(job)
        reply = refusal if refusal is not None else await self.ctx.sessions.accept(job.offer)
        if isinstance(reply, SessionAccepted):
            request = WorkerRequest(
                job.request_id, Phase.AWAITING_KV, Path.DISAGG, job.stream_subject, job.num_prompt_tokens, job.sampling,
                decode_worker=self.ctx.worker_id, num_generated=1,  # the prefill worker streamed the first token
            )
            self.ctx.requests.add(request)
            task = asyncio.create_task(self._continue(request, job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            log.warning("handoff_refused", request_id=job.request_id, reason=reply.message)
        await msg.respond(protocol.encode(reply))

    async def _continue(self, request: WorkerRequest, job: DecodeJob) -> None:
        structlog.contextvars.bind_contextvars(request_id=job.request_id)
        ctx = self.ctx
        engine = ctx.engine_loop.engine
        try:
            pulled = await ctx.sessions.pull(job.request_id)
        except Exception as exc:  # refused late, lease over, partial: nothing was written
            log.warning("kv_receive_failed", error=repr(exc))
            await self.release(job.request_id, Ending.failed(f"KV transfer failed: {exc}", ErrorCode.UNAVAILABLE))
            return
        stats = pulled.stats
        log.info("kv_received", nbytes=stats.nbytes, seconds=round(stats.seconds, 4), messages=stats.num_messages)
        ctx.metrics.labels(ctx.metrics.kv_transfer_bytes, direction="received").inc(stats.nbytes)
        ctx.metrics.labels(ctx.metrics.kv_transfer_seconds, direction="received").observe(stats.seconds)
        request.kv_transfer = stats
        reserved = job.num_prompt_tokens + job.sampling.max_tokens
        group = job.offer.dst_dp_group  # the DP group whose ranks received the KV
        while True:
            if not await self._wait_for_room(job.request_id, reserved, group):
                return  # released (cancelled) while waiting for room
            placing_started = time.perf_counter()
            try:
                await ctx.engine_loop.call(self._place, job, pulled)
                break
            except KvCacheFullError:
                continue  # other hand-offs took the pages between the check and the admission: wait again
            except Exception as exc:
                log.exception("kv_import_failed")  # the engine returned the pages already
                await self.release(job.request_id, Ending.failed(f"KV import failed: {exc}"))
                return
        ctx.metrics.labels(ctx.metrics.reshard_seconds).observe(time.perf_counter() - placing_started)
        if job.request_id not in ctx.requests:  # released while the KV was being placed
            await ctx.engine_loop.call(engine.free, job.request_id)
            return
        request.phase = Phase.DECODING
        ctx.engine_loop.wake()

    def _place(self, job: DecodeJob, pulled) -> None:
        """On the engine thread: reserve pages, every rank scatters into them, join the running batch."""
        if job.request_id not in self.ctx.requests:
            return
        engine = self.ctx.engine_loop.engine
        engine.add_prefilled_with(
            job.request_id, job.num_prompt_tokens, job.first_token, engine_sampling(job.sampling), pulled.write_into,
            dp_group=job.offer.dst_dp_group,
        )

    async def _wait_for_room(self, request_id: str, num_tokens: int, dp_group: int) -> bool:
        """Waits (in the worker's bounded queue) until the cache can take the request; False if it was released.

        Blocks free as running requests finish, so this never waits on itself; the queue
        bound (`max_waiting`) keeps it finite.
        """
        engine = self.ctx.engine_loop.engine
        while not engine.can_admit(num_tokens, dp_group):
            if request_id not in self.ctx.requests:
                return False
            await asyncio.sleep(KV_ROOM_POLL_S)
        return request_id in self.ctx.requests
