"""Decode worker: receives a prefilled request's KV over UCX and continues it.

Life cycle of a DecodeJob:
  announced over NATS -> checked for compatibility (model, dtype, shape) before any
  byte moves -> receives posted, KvReady replied -> KV bytes arrive over UCX ->
  written into this worker's paged cache -> joins the running batch at token N+1 ->
  tokens streamed to the gateway until a stop condition, then its blocks are freed.
A refused, failed or timed-out transfer writes nothing into the cache.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog

from services.worker.context import WorkerContext, dtype_from_name, dtype_name, engine_sampling, wait_for_kv_room
from shared import protocol
from shared.protocol import DecodeJob, ErrorCode, FinishReason, KvDescriptor, KvReady, ServiceError
from shared.transport.ucx_kv import KvReceiver

log = structlog.get_logger()

_job_decoder = protocol.decoder(DecodeJob)

# Generous: the first transfer on a new endpoint pays for connection warm-up.
TRANSFER_TIMEOUT_BASE_S = 30.0
TRANSFER_MIN_BYTES_PER_S = 50e6


def incompatibility(ctx: WorkerContext, kv: KvDescriptor) -> str | None:
    """Names the first field in which the sender's KV does not fit this decoder."""
    config = ctx.model.config
    expected = {
        "model_fingerprint": config.fingerprint(),
        "dtype": dtype_name(ctx.kv_dtype),
        "num_layers": config.num_layers,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
    }
    layers, pair, _tokens, kv_heads, head_dim = kv.shape
    got = {
        "model_fingerprint": kv.model_fingerprint,
        "dtype": kv.dtype,
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
    }
    for field_name, want in expected.items():
        if got[field_name] != want:
            return f"KV {field_name} mismatch: sender has {got[field_name]!r}, decoder expects {want!r}"
    if pair != 2:
        return f"KV shape must hold K and V (dimension 1 == 2), got {kv.shape}"
    return None


class DecodeHandler:
    def __init__(self, ctx: WorkerContext, receiver: KvReceiver, ucx_host: str):
        self.ctx = ctx
        self.receiver = receiver
        self.ucx_host = ucx_host
        self._tasks: set[asyncio.Task] = set()

    async def on_job(self, msg) -> None:
        try:
            job = _job_decoder.decode(msg.data)
        except (msgspec.DecodeError, ValueError) as exc:
            await msg.respond(protocol.encode(ServiceError(ErrorCode.BAD_REQUEST, f"malformed decode job: {exc}")))
            return
        problem = incompatibility(self.ctx, job.kv)
        if problem is None and not self.ctx.engine_loop.engine.fits_budget(job.num_prompt_tokens + job.sampling.max_tokens):
            problem = "request does not fit this decoder's KV budget"
        refusal = ServiceError(ErrorCode.BAD_REQUEST, problem) if problem else self.ctx.refusal()
        if job.request_id in self.ctx.cancelled:
            self.ctx.cancelled.discard(job.request_id)
            refusal = ServiceError(ErrorCode.BAD_REQUEST, "request was cancelled")
        if refusal is not None:
            log.warning("handoff_refused", request_id=job.request_id, reason=refusal.message)
            await msg.respond(protocol.encode(refusal))
            return
        self.ctx.waiting += 1
        nbytes = sum(seg.nbytes for seg in job.kv.segments)
        timeout = TRANSFER_TIMEOUT_BASE_S + nbytes / TRANSFER_MIN_BYTES_PER_S
        receiving = asyncio.create_task(self.receiver.receive(job.kv.segments, timeout=timeout))
        task = asyncio.create_task(self._continue(job, receiving))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await msg.respond(protocol.encode(KvReady(self.ctx.worker_id, self.ucx_host, self.receiver.port)))

    async def _continue(self, job: DecodeJob, receiving: asyncio.Task) -> None:
        structlog.contextvars.bind_contextvars(request_id=job.request_id)
        ctx = self.ctx
        try:
            buffers, stats = await receiving
        except Exception as exc:
            log.warning("kv_receive_failed", error=repr(exc))
            await ctx.streams.publish_to(job.stream_subject, job.request_id, FinishReason.ERROR, f"KV transfer failed: {exc!r}")
            return
        finally:
            ctx.waiting -= 1
        if job.request_id in ctx.cancelled:
            ctx.cancelled.discard(job.request_id)
            return
        kv = buffers[0].view(dtype_from_name(job.kv.dtype)).reshape(job.kv.shape)
        if not await wait_for_kv_room(ctx, job.request_id, job.num_prompt_tokens + job.sampling.max_tokens):
            return  # cancelled while waiting for room
        log.info("kv_received", nbytes=stats.nbytes, seconds=round(stats.seconds, 4), messages=stats.num_messages)
        ctx.metrics.labels(ctx.metrics.kv_transfer_bytes, direction="received").inc(stats.nbytes)
        ctx.metrics.labels(ctx.metrics.kv_transfer_seconds, direction="received").observe(stats.seconds)
        placing_started = time.perf_counter()
        try:
            await ctx.engine_loop.call(
                ctx.engine_loop.engine.add_prefilled,
                job.request_id,
                job.num_prompt_tokens,
                job.first_token,
                kv,
                engine_sampling(job.sampling),
            )
        except Exception as exc:
            log.exception("kv_import_failed")
            await ctx.engine_loop.call(ctx.engine_loop.engine.free, job.request_id)
            await ctx.streams.publish_to(job.stream_subject, job.request_id, FinishReason.ERROR, f"KV import failed: {exc}")
            return
        ctx.metrics.labels(ctx.metrics.reshard_seconds).observe(time.perf_counter() - placing_started)
        if job.request_id in ctx.cancelled:  # cancelled while the KV was being placed
            ctx.cancelled.discard(job.request_id)
            await ctx.engine_loop.call(ctx.engine_loop.engine.free, job.request_id)
            return
        ctx.streams.open(job.request_id, job.stream_subject, kv_transfer=stats)
        ctx.engine_loop.wake()


