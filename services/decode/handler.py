"""Decode worker: pulls a prefilled request's KV (re-sharded to its layout) and continues it.

Life cycle of a DecodeJob:
  offer arrives over NATS -> refused if this worker cannot take it (draining, queue full,
  over budget, cancelled) or if the session does not fit (model, layers, heads, head_dim,
  dtype, layout: the refusal names the field) -> receives posted into staging buffers,
  SessionAccepted replied -> every rank pair's buffer arrives over UCX -> pages reserved,
  the buffers re-sharded (scattered) straight into them -> joins the running batch at
  token N+1 -> tokens streamed to the gateway until a stop condition, then its blocks
  are freed.
A refused, failed or timed-out transfer writes nothing into the cache.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog

from services.worker.context import WorkerContext, engine_sampling, wait_for_kv_room
from shared import protocol
from shared.engine.engine import KvCacheFullError
from shared.protocol import (
    DecodeJob,
    ErrorCode,
    FinishReason,
    ServiceError,
    SessionAccepted,
)

log = structlog.get_logger()

_job_decoder = protocol.decoder(DecodeJob)


class DecodeHandler:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self._tasks: set[asyncio.Task] = set()

    def _refusal(self, job: DecodeJob) -> ServiceError | None:
        ctx = self.ctx
        if job.request_id in ctx.cancelled:
            ctx.cancelled.discard(job.request_id)
            return ServiceError(ErrorCode.BAD_REQUEST, "request was cancelled")
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
            self.ctx.waiting += 1
            task = asyncio.create_task(self._continue(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            log.warning("handoff_refused", request_id=job.request_id, reason=reply.message)
        await msg.respond(protocol.encode(reply))

    async def _continue(self, job: DecodeJob) -> None:
        structlog.contextvars.bind_contextvars(request_id=job.request_id)
        try:
            await self._receive_and_place(job)
        finally:
            self.ctx.waiting -= 1  # placed (now running), failed or cancelled

    async def _receive_and_place(self, job: DecodeJob) -> None:
        ctx = self.ctx
        engine = ctx.engine_loop.engine
        try:
            pulled = await ctx.sessions.pull(job.request_id)
        except Exception as exc:
            log.warning("kv_receive_failed", error=repr(exc))
            await ctx.streams.publish_to(job.stream_subject, job.request_id, FinishReason.ERROR, f"KV transfer failed: {exc}")
            return
        stats = pulled.stats
        log.info("kv_received", nbytes=stats.nbytes, seconds=round(stats.seconds, 4), messages=stats.num_messages)
        ctx.metrics.labels(ctx.metrics.kv_transfer_bytes, direction="received").inc(stats.nbytes)
        ctx.metrics.labels(ctx.metrics.kv_transfer_seconds, direction="received").observe(stats.seconds)

        def scatter_into_pages(block_table: list[int]) -> None:
            pulled.write_into(*engine.kv_cache.hnd_views(), block_table)  # the re-shard, straight into the cache

        while True:
            if not await wait_for_kv_room(ctx, job.request_id, job.num_prompt_tokens + job.sampling.max_tokens):
                return  # cancelled while waiting for room
            placing_started = time.perf_counter()
            try:
                await ctx.engine_loop.call(
                    engine.add_prefilled_with,
                    job.request_id, job.num_prompt_tokens, job.first_token, engine_sampling(job.sampling), scatter_into_pages,
                )  # fmt: skip
                break
            except KvCacheFullError:
                continue  # other hand-offs took the pages between the check and the admission: wait again
            except Exception as exc:
                log.exception("kv_import_failed")  # the engine returned the pages already
                await ctx.streams.publish_to(job.stream_subject, job.request_id, FinishReason.ERROR, f"KV import failed: {exc}")
                return
        ctx.metrics.labels(ctx.metrics.reshard_seconds).observe(time.perf_counter() - placing_started)
        if job.request_id in ctx.cancelled:  # cancelled while the KV was being placed
            ctx.cancelled.discard(job.request_id)
            await ctx.engine_loop.call(engine.free, job.request_id)
            return
        ctx.streams.open(job.request_id, job.stream_subject, kv_transfer=stats)
        ctx.engine_loop.wake()
