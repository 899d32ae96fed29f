"""Prefill worker: queues prompts on the engine, streams each first token, hands the KV to a decoder.

Life cycle of a PrefillJob:
  accepted (acked at once, counted as waiting) -> queued on the engine (add_handoff_request
  or add_request) -> admitted when its pages are free -> prompt runs in chunks, batched
  with other prompts and decodes under the step's token budget -> first token out of a
  step -> published to the gateway's stream -> either finished (EOS / max_tokens=1), or
  decoding on here (colocated path: the engine keeps it in the running batch), or its KV
  exported and pushed over UCX to the chosen decode worker (disaggregated path; the
  engine released its pages when it handed out the KV).
"""

from __future__ import annotations

import asyncio

import msgspec
import structlog
import torch

from services.worker.context import WorkerContext, engine_sampling, finish_reason, token_logprobs
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

    @property
    def num_handoffs_in_flight(self) -> int:
        return len(self._tasks)

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
        ctx = self.ctx
        ctx.expect_first_token(job)
        # Ack before queueing: the engine thread may be inside a long prefill step, and the
        # gateway must not wait on it to learn the job was taken.
        await msg.respond(protocol.encode(JobAccepted(ctx.worker_id)))
        if job.path is Path.COLOCATED:
            ctx.streams.open(job.request_id, job.stream_subject)
        try:
            queued = await ctx.engine_loop.call(self._queue, job)
        except Exception as exc:  # refused by the engine (ids out of range, beyond the context, queue full)
            log.warning("prefill_refused_by_engine", request_id=job.request_id, error=str(exc))
            await self.fail(job.request_id, f"prefill refused: {exc}")
            return
        if queued:
            ctx.engine_loop.wake()
        else:  # cancelled before it reached the engine
            ctx.take_prefill(job.request_id)
            ctx.streams.close(job.request_id)

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

    def _queue(self, job: PrefillJob) -> bool:
        """On the engine thread. False when the job was cancelled before it got here."""
        if job.request_id in self.ctx.cancelled:
            return False
        engine = self.ctx.engine_loop.engine
        add = engine.add_handoff_request if job.path is Path.DISAGG else engine.add_request
        add(job.request_id, job.prompt_ids, engine_sampling(job.sampling))
        return True

    async def fail(self, request_id: str, error: str) -> bool:
        """Ends a job whose first token will not come (engine refusal, failed step); False if not ours."""
        job = self.ctx.take_prefill(request_id)
        if job is None:
            return False
        self.ctx.streams.close(request_id)
        await self.ctx.streams.publish_to(job.stream_subject, request_id, FinishReason.ERROR, error)
        return True

    async def on_first_token(self, out: TokenOutput) -> bool:
        """Routes a step's output that is a prefill job's first token; False if it is not one."""
        job = self.ctx.take_prefill(out.request_id)
        if job is None:
            return False
        if job.path is Path.COLOCATED:
            return False  # the stream is open here: it goes out like every later token
        event = TokenEvent(
            job.request_id, self.ctx.worker_id, [out.token_id], finish_reason(out.finish_reason), logprobs=token_logprobs(out)
        )
        await self.ctx.nc.publish(job.stream_subject, protocol.encode(event))
        if out.kv is not None:  # not finished by its first token: the decoder continues it
            task = asyncio.create_task(self._hand_off(job, out, out.kv))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _hand_off(self, job: PrefillJob, first: TokenOutput, kv: torch.Tensor) -> None:
        """Push the KV through a session: the decoder validates the offer, then bytes move over UCX."""
        structlog.contextvars.bind_contextvars(request_id=job.request_id)
        ctx = self.ctx
        if job.request_id in ctx.cancelled:  # cancelled between its first token and now
            ctx.cancelled.discard(job.request_id)
            return
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
