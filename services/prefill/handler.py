"""Prefill worker: runs a prompt, streams the first token, hands the KV to a decoder.

Life cycle of a PrefillJob:
  accepted (acked at once) -> queued on the engine thread -> prefill -> first token
  published to the gateway's stream -> either finished (EOS / max_tokens=1), or kept
  here for local decode (colocated path), or exported and pushed over UCX to the
  chosen decode worker (disaggregated path), after which its blocks are freed.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog
import torch

from services.worker.context import WorkerContext, engine_sampling, finish_reason, wait_for_kv_room
from services.worker.handoff import PendingDecode, outgoing_layout
from shared import protocol
from shared.engine.engine import TokenOutput
from shared.layouts import parse_layout
from shared.protocol import (
    ErrorCode,
    FinishReason,
    JobAccepted,
    Path,
    PrefillJob,
    Role,
    ServiceError,
    TokenEvent,
)

log = structlog.get_logger()

_job_decoder = protocol.decoder(PrefillJob)


class PrefillHandler:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self._tasks: set[asyncio.Task] = set()

    async def on_job(self, msg) -> None:
        try:
            job = _job_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            await msg.respond(protocol.encode(ServiceError(ErrorCode.BAD_REQUEST, f"malformed prefill job: {exc}")))
            return
        refusal = self._refusal(job)
        if refusal is not None:
            await msg.respond(protocol.encode(refusal))
            return
        self.ctx.waiting += 1  # counted from acceptance, so bursts see a full queue at once
        self.ctx.queued_prefill_tokens += len(job.prompt_ids)
        await msg.respond(protocol.encode(JobAccepted(self.ctx.worker_id)))
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refusal(self, job: PrefillJob) -> ServiceError | None:
        ctx = self.ctx
        if job.path is Path.COLOCATED and ctx.role is Role.PREFILL:
            return ServiceError(ErrorCode.BAD_REQUEST, f"{ctx.worker_id} is a prefill-only worker; it cannot decode locally")
        if job.path is Path.DISAGG and ctx.role is Role.DECODE:
            return ServiceError(ErrorCode.BAD_REQUEST, f"{ctx.worker_id} is a decode worker; it prefills only for itself")
        engine = ctx.engine_loop.engine
        needed = len(job.prompt_ids) + job.sampling.max_tokens
        if not engine.fits_budget(needed):
            return ServiceError(ErrorCode.BAD_REQUEST, f"request needs {needed} KV tokens; this worker holds at most {engine.max_tokens}")
        return ctx.refusal()

    async def _run(self, job: PrefillJob) -> None:
        structlog.contextvars.bind_contextvars(request_id=job.request_id)
        ctx = self.ctx
        engine = ctx.engine_loop.engine
        try:
            if not await wait_for_kv_room(ctx, job.request_id, len(job.prompt_ids) + job.sampling.max_tokens):
                return  # cancelled while queued
            started = time.perf_counter()
            sampling = engine_sampling(job.sampling)
            if job.path is Path.DISAGG:
                # One engine call: on a role=both worker a decode step could otherwise run
                # (or finish and free) the sequence between prefill and export.
                first, kv = await ctx.engine_loop.call(engine.prefill_and_export, job.request_id, job.prompt_ids, sampling)
            else:
                first, kv = await ctx.engine_loop.call(engine.prefill, job.request_id, job.prompt_ids, sampling), None
            ctx.rates.observe_prefill(len(job.prompt_ids), time.perf_counter() - started)
            ctx.metrics.labels(ctx.metrics.prefill_tokens).inc(len(job.prompt_ids))
        except Exception as exc:
            log.exception("prefill_failed")
            await ctx.engine_loop.call(engine.free, job.request_id)
            await ctx.streams.publish_to(job.stream_subject, job.request_id, FinishReason.ERROR, f"prefill failed: {exc}")
            return
        finally:
            ctx.queued_prefill_tokens -= len(job.prompt_ids)
            ctx.waiting -= 1
        if job.request_id in ctx.cancelled:
            ctx.cancelled.discard(job.request_id)
            await ctx.engine_loop.call(engine.free, job.request_id)
            return
        if first.finish_reason is not None or kv is not None:
            await self._publish_first(job, first)
        if first.finish_reason is not None:
            await ctx.engine_loop.call(engine.free, job.request_id)
        elif kv is None:  # colocated: this worker decodes it too
            ctx.streams.open(job.request_id, job.stream_subject)
            await ctx.streams.publish(job.request_id, [first.token_id])
            ctx.engine_loop.wake()
        else:
            await self._hand_off(job, first, kv)

    async def _publish_first(self, job: PrefillJob, first: TokenOutput) -> None:
        event = TokenEvent(job.request_id, self.ctx.worker_id, [first.token_id], finish_reason(first.finish_reason))
        await self.ctx.nc.publish(job.stream_subject, protocol.encode(event))

    async def _hand_off(self, job: PrefillJob, first: TokenOutput, kv: torch.Tensor) -> None:
        """Push the KV through a session: the decoder validates the offer, then bytes move over UCX."""
        ctx = self.ctx
        ctx.announcer.pending[job.request_id] = PendingDecode(
            job.decode_worker, len(job.prompt_ids), first.token_id, job.sampling, job.stream_subject
        )
        try:
            session = ctx.sessions.create_session(job.request_id, layout=outgoing_layout(ctx.role, ctx.layout))
            target = parse_layout(job.decode_layout, "decode")
            stats = await session.push(kv, target_layout=target, decoder=job.decode_worker, dst_dp_group=job.decode_dp_group)
        except Exception as exc:  # refused (names the field), unreachable, or failed mid-way
            log.warning("handoff_failed", decode_worker=job.decode_worker, error=str(exc))
            await ctx.streams.publish_to(job.stream_subject, job.request_id, FinishReason.ERROR, f"KV hand-off failed: {exc}")
            return
        finally:
            ctx.announcer.pending.pop(job.request_id, None)
        ctx.rates.observe_handoff(stats.nbytes, stats.seconds)
        ctx.metrics.labels(ctx.metrics.kv_transfer_bytes, direction="sent").inc(stats.nbytes)
        ctx.metrics.labels(ctx.metrics.kv_transfer_seconds, direction="sent").observe(stats.seconds)
        log.info("kv_pushed", nbytes=stats.nbytes, seconds=round(stats.seconds, 4), messages=stats.num_messages, decode_worker=job.decode_worker)
