"""Prefill worker: queues prompts on the engine, streams each first token, hands the KV to a decoder.

Life cycle of a PrefillJob (phases of the request table, services/worker/requests.py):
  accepted (acked at once) -> QUEUED on the engine (add_handoff_request or add_request)
  -> PREFILLING once admitted (prompt chunks, batched with other prompts and decodes under
  the step's token budget) -> first token out of a step, published to the gateway's stream
  -> either ended (EOS / max_tokens=1), or DECODING here (colocated path), or HANDING_OFF:
  every rank holds its shard of the prompt's KV (the engine released its pages) and the
  session pushes it to the chosen decoder.
A hand-off the decoder refuses or cannot take (unreachable, full, gone mid-transfer) is
offered to another decoder (the scheduler picks one, excluding those that failed) while the
KV's lease lasts; failing that, a worker that can decode continues the request itself,
else it ends with a 503-class error. The KV is dropped on every rank when the request ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
import structlog

from services.worker.context import WorkerContext, engine_sampling, finish_reason, token_logprobs
from services.worker.handoff import DecodeJobOffer, outgoing_layout
from services.worker.requests import DONE, Ending, Phase, WorkerRequest
from shared import protocol
from shared.engine.engine import TokenOutput
from shared.kv_spec import IncompatibleKvError
from shared.layouts import parse_layout
from shared.protocol import (
    ErrorCode,
    JobAccepted,
    Path,
    PlaceReply,
    PlaceRequest,
    Placement,
    PrefillJob,
    Role,
    ServiceError,
)
from shared.session import ExportedKv, KvTransferError

log = structlog.get_logger()

_job_decoder = protocol.decoder(PrefillJob)
_place_reply = protocol.decoder(PlaceReply)

MAX_HANDOFF_ATTEMPTS = 3  # decoders tried for one request's KV (the lease bounds the time too)
PLACE_TIMEOUT_S = 2.0

Release = Callable[[str, Ending], Awaitable[bool]]


class PrefillHandler:
    def __init__(self, ctx: WorkerContext, release: Release):
        self.ctx = ctx
        self.release = release
        self._jobs: dict[str, PrefillJob] = {}  # until the first token: what the hand-off needs
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
        ctx = self.ctx
        ctx.requests.add(
            WorkerRequest(
                job.request_id, Phase.QUEUED, job.path, job.stream_subject, len(job.prompt_ids), job.sampling, job.decode_worker
            )
        )
        self._jobs[job.request_id] = job
        # Ack before queueing, and queue in a task of its own: the engine thread may be inside a
        # long step, and neither this gateway nor the next job (NATS runs a subscription's
        # callbacks one at a time) may wait on it.
        await msg.respond(protocol.encode(JobAccepted(ctx.worker_id)))
        task = asyncio.create_task(self._queue_on_engine(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _queue_on_engine(self, job: PrefillJob) -> None:
        ctx = self.ctx
        try:
            await ctx.engine_loop.call(self._queue, job)
        except Exception as exc:  # refused by the engine (ids out of range, beyond the context, queue full)
            log.warning("prefill_refused_by_engine", request_id=job.request_id, error=str(exc))
            await self.release(job.request_id, Ending.failed(f"prefill refused: {exc}", ErrorCode.BAD_REQUEST))
            return
        ctx.engine_loop.wake()

    def _refusal(self, job: PrefillJob) -> ServiceError | None:
        ctx = self.ctx
        if job.request_id in ctx.cancelled:
            ctx.cancelled.discard(job.request_id)
            return ServiceError(ErrorCode.BAD_REQUEST, "request was cancelled")
        if job.request_id in ctx.requests:
            return ServiceError(ErrorCode.BAD_REQUEST, f"request {job.request_id!r} is already on {ctx.worker_id}")
        if job.path is Path.COLOCATED and ctx.role is Role.PREFILL:
            return ServiceError(ErrorCode.BAD_REQUEST, f"{ctx.worker_id} is a prefill-only worker; it cannot decode locally")
        if job.path is Path.DISAGG and ctx.role is Role.DECODE:
            return ServiceError(ErrorCode.BAD_REQUEST, f"{ctx.worker_id} is a decode worker; it prefills only for itself")
        engine = ctx.engine_loop.engine
        needed = len(job.prompt_ids) + job.sampling.max_tokens
        if not engine.fits_budget(needed):
            return ServiceError(ErrorCode.BAD_REQUEST, f"request needs {needed} KV tokens; this worker holds at most {engine.max_tokens}")
        return ctx.refusal()

    def _queue(self, job: PrefillJob) -> None:
        """On the engine thread. A job released meanwhile (cancelled) is not queued."""
        if job.request_id not in self.ctx.requests:
            return
        engine = self.ctx.engine_loop.engine
        if job.path is Path.DISAGG:
            engine.add_handoff_request(job.request_id, job.prompt_ids, engine_sampling(job.sampling))
        else:  # decoded here: in the DP group the scheduler chose (the least loaded)
            group = job.decode_dp_group if job.decode_dp_group < engine.dp else None
            engine.add_request(job.request_id, job.prompt_ids, engine_sampling(job.sampling), dp_group=group)

    def forget(self, request_id: str) -> None:
        """The request ended: the job's details are not needed any more."""
        self._jobs.pop(request_id, None)

    async def on_first_token(self, request: WorkerRequest, out: TokenOutput) -> None:
        """A prefill job's first token: streamed from here; then decoded here or its KV handed off."""
        reason = finish_reason(out.finish_reason)
        if request.path is Path.COLOCATED:
            request.phase = Phase.DECODING
            await self.ctx.streams.publish(request, [out.token_id], reason, token_logprobs(out))
            if reason is not None:
                await self.release(request.request_id, DONE)
            return
        await self.ctx.streams.publish(request, [out.token_id], reason, token_logprobs(out))
        job = self._jobs.get(request.request_id)
        if reason is not None or not out.kv_held or job is None:
            await self.release(request.request_id, DONE)  # finished by its first token: nothing to hand off
            return
        request.phase = Phase.HANDING_OFF
        task = asyncio.create_task(self._hand_off(request, job, out.token_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hand_off(self, request: WorkerRequest, job: PrefillJob, first_token: int) -> None:
        """Pushes the KV through a session; on failure offers it to another decoder while the lease lasts."""
        structlog.contextvars.bind_contextvars(request_id=request.request_id)
        ctx = self.ctx
        target = Placement(request.request_id, Path.DISAGG, ctx.worker_id, job.decode_worker, job.decode_layout, job.decode_dp_group)
        tried: list[str] = []
        error: Exception | None = None
        for _ in range(MAX_HANDOFF_ATTEMPTS):
            tried.append(target.decode_worker)
            try:
                await self._push(request, job, target, first_token)
                await self.release(request.request_id, DONE)
                return
            except (IncompatibleKvError, KvTransferError, ValueError) as exc:  # refused, unreachable, failed mid-way
                error = exc
                log.warning("handoff_failed", decode_worker=target.decode_worker, error=str(exc))
            if request.request_id not in ctx.requests:
                return  # cancelled meanwhile: the release dropped the KV
            if asyncio.get_running_loop().time() >= ctx.sessions.lease_deadline(request.request_id):
                break
            another = await self._another_decoder(request, tried)
            if another is None:
                break
            target = another
            await ctx.streams.publish(request, [], decode_worker=target.decode_worker)  # the gateway follows the move
        if request.request_id in ctx.requests and await self._decode_here(request, first_token):
            return
        await self.release(request.request_id, Ending.failed(f"KV hand-off failed: {error}", ErrorCode.UNAVAILABLE))

    async def _decode_here(self, request: WorkerRequest, first_token: int) -> bool:
        """A worker that decodes too continues the request from the KV it still holds (one-rank groups)."""
        ctx = self.ctx
        kv = ctx.sessions.local_kv(request.request_id)
        if ctx.role is not Role.BOTH or kv is None:
            return False
        engine = ctx.engine_loop.engine
        try:
            await ctx.engine_loop.call(
                engine.add_prefilled, request.request_id, request.num_prompt_tokens, first_token, kv, engine_sampling(request.sampling)
            )
        except Exception as exc:  # no room for it here either
            log.warning("decode_here_failed", error=repr(exc))
            return False
        ctx.sessions.cancel(request.request_id)
        request.phase = Phase.DECODING
        await ctx.streams.publish(request, [], decode_worker=ctx.worker_id)
        ctx.engine_loop.wake()
        return True

    async def _push(self, request: WorkerRequest, job: PrefillJob, target: Placement, first_token: int) -> None:
        ctx = self.ctx
        offer = DecodeJobOffer(ctx.nc, ctx.subjects, request.num_prompt_tokens, first_token, request.sampling, request.stream_subject)
        session = ctx.sessions.create_session(request.request_id, layout=outgoing_layout(ctx.role, ctx.layout), announcer=offer)
        stats = await session.push(
            ExportedKv(request.num_prompt_tokens),
            target_layout=parse_layout(target.decode_layout, "decode"),
            decoder=target.decode_worker,
            dst_dp_group=target.decode_dp_group,
        )
        ctx.rates.observe_handoff(stats.nbytes, stats.seconds)
        ctx.metrics.labels(ctx.metrics.kv_transfer_bytes, direction="sent").inc(stats.nbytes)
        ctx.metrics.labels(ctx.metrics.kv_transfer_seconds, direction="sent").observe(stats.seconds)
        log.info("kv_pushed", nbytes=stats.nbytes, seconds=round(stats.seconds, 4), messages=stats.num_messages, decode_worker=target.decode_worker)

    async def _another_decoder(self, request: WorkerRequest, tried: list[str]) -> Placement | None:
        """The scheduler's pick among the decoders not tried yet, or None."""
        ask = PlaceRequest(
            request.request_id, self.ctx.model.name, request.num_prompt_tokens, request.sampling.max_tokens,
            exclude=tried, decode_only=True,
        )
        try:
            reply = await self.ctx.nc.request(self.ctx.subjects.place, protocol.encode(ask), timeout=PLACE_TIMEOUT_S)
            placement = _place_reply.decode(reply.data)
        except Exception as exc:  # no scheduler, timeout
            log.warning("no_other_decoder", error=repr(exc))
            return None
        return placement if isinstance(placement, Placement) else None

