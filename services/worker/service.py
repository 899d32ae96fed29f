"""A worker process: engine + NATS control + UCX data, for role prefill, decode or both.

Admin endpoints: `status`, `drain` (stop taking work, finish what is in flight, exit),
`cancel`, `loglevel`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as NatsClient

from services.decode.handler import DecodeHandler
from services.prefill.handler import PrefillHandler
from services.scheduler.registry import HEARTBEAT_INTERVAL_S
from services.worker.context import WorkerContext, finish_reason, token_logprobs
from services.worker.engine_loop import EngineLoop
from services.worker.handoff import kv_spec_of, parse_worker_layout, session_engine
from services.worker.metrics import WorkerMetrics
from services.worker.streams import TokenStreams
from shared import protocol
from shared.admin import AdminError, start_admin
from shared.engine.engine import Engine, TokenOutput
from shared.engine.loader import LoadedModel
from shared.layouts import Layout
from shared.protocol import CancelRequest, FinishReason, Heartbeat, Role
from shared.subjects import Subjects
from shared.transport.ucx_kv import KvReceiver, KvSender

log = structlog.get_logger()

_cancel_decoder = protocol.decoder(CancelRequest)
_heartbeat_decoder = protocol.decoder(Heartbeat)


class WorkerService:
    def __init__(
        self,
        nc: NatsClient,
        subjects: Subjects,
        worker_id: str,
        role: Role,
        model: LoadedModel,
        engine: Engine,
        layout: Layout | None = None,
        ucx_host: str = "127.0.0.1",
        max_waiting: int = 64,
        metrics_port: int = 0,
        on_drained: Callable[[], None] = lambda: None,
    ):
        self.ucx_host = ucx_host
        self.metrics_port = metrics_port
        self.receiver = KvReceiver(ucx_host)
        self.sender = KvSender()
        layout = layout if layout is not None else parse_worker_layout(role, "")
        sessions, announcer = session_engine(nc, subjects, kv_spec_of(model, engine), layout, self.sender, self.receiver)
        self.ctx = WorkerContext(
            nc=nc,
            subjects=subjects,
            worker_id=worker_id,
            role=role,
            model=model,
            engine_loop=EngineLoop(engine, self._on_tokens, self._on_step_failure, self._on_step),
            streams=TokenStreams(nc, worker_id),
            kv_dtype=engine.kv_dtype,
            metrics=WorkerMetrics(worker_id, role.label),
            max_waiting=max_waiting,
            layout=layout,
            sessions=sessions,
            announcer=announcer,
        )
        # Every role takes prefill jobs: a decode worker prefills for itself when the
        # scheduler decides a hand-off does not pay (auto mode).
        self.prefill = PrefillHandler(self.ctx)
        self._on_drained = on_drained
        self._subscriptions = []
        self._tasks: list[asyncio.Task] = []
        self._admin = None
        self._warmed: set[tuple[str, int]] = set()
        self.incarnation = uuid.uuid4().hex[:12]  # this run of the process: a restart under the same id is another

    @property
    def engine(self) -> Engine:
        return self.ctx.engine_loop.engine

    async def start(self) -> None:
        ctx = self.ctx
        await self.receiver.start()
        ctx.engine_loop.start()
        subjects = ctx.subjects
        self._subscriptions.append(await ctx.nc.subscribe(subjects.worker_prefill(ctx.worker_id), cb=self.prefill.on_job))
        if ctx.role in (Role.DECODE, Role.BOTH):
            decode = DecodeHandler(ctx)
            self._subscriptions.append(await ctx.nc.subscribe(subjects.worker_decode(ctx.worker_id), cb=decode.on_job))
        self._subscriptions.append(await ctx.nc.subscribe(subjects.worker_cancel(ctx.worker_id), cb=self._on_cancel))
        if ctx.role in (Role.PREFILL, Role.BOTH):
            self._subscriptions.append(await ctx.nc.subscribe(subjects.all_heartbeats, cb=self._warm_up_decoder))
        self._admin = await start_admin(
            ctx.nc,
            subjects,
            "worker",
            ctx.worker_id,
            {"status": self._status, "drain": self._drain, "cancel": self._admin_cancel},
        )
        if self.metrics_port:
            ctx.metrics.serve(self.metrics_port)
        await self._beat()  # be placeable at once, not one interval later
        self._tasks.append(asyncio.create_task(self._beat_forever(), name="heartbeat"))
        log.info("worker_started", worker_id=ctx.worker_id, role=ctx.role.label, model=ctx.model.name, ucx_port=self.receiver.port)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._admin is not None:
            await self._admin.stop()
        for sub in self._subscriptions:
            await sub.unsubscribe()
        await self.ctx.engine_loop.stop()
        await self.sender.close()
        await self.receiver.close()

    async def _on_tokens(self, outputs: list[TokenOutput]) -> None:
        metrics = self.ctx.metrics
        metrics.labels(metrics.generated_tokens).inc(len(outputs))
        finished = []
        for out in outputs:
            if await self.prefill.on_first_token(out):
                continue  # a hand-off's first token: published, its KV on its way
            reason = finish_reason(out.finish_reason)
            await self.ctx.streams.publish(out.request_id, [out.token_id], reason, logprobs=token_logprobs(out))
            if reason is not None:
                finished.append(out.request_id)
        if finished:
            await self.ctx.engine_loop.call(self._free_all, finished)

    def _free_all(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.free(request_id)

    async def _on_step_failure(self, request_ids: list[str], error: str) -> None:
        for request_id in request_ids:
            if not await self.prefill.fail(request_id, error):
                await self.ctx.streams.publish(request_id, [], FinishReason.ERROR, error=error)

    def _on_step(self, prompt_tokens: int, seconds: float) -> None:
        metrics = self.ctx.metrics
        metrics.labels(metrics.step_seconds).observe(seconds)
        if prompt_tokens:
            self.ctx.rates.observe_prefill(prompt_tokens, seconds)
            metrics.labels(metrics.prefill_tokens).inc(prompt_tokens)
            metrics.labels(metrics.step_prompt_tokens).observe(prompt_tokens)

    async def cancel(self, request_id: str) -> bool:
        """Stops the request wherever it is on this worker; True if it held it."""
        held = request_id in self.ctx.streams or request_id in self.ctx.prefills or self.engine.holds(request_id)
        self.ctx.streams.close(request_id)
        self.ctx.cancelled.add(request_id)
        self.ctx.take_prefill(request_id)
        self.ctx.sessions.cancel(request_id)  # drops staged receives of a hand-off in flight
        await self.ctx.engine_loop.call(self.engine.abort, request_id)
        log.info("cancelled", request_id=request_id, held=held)
        return held

    async def _warm_up_decoder(self, msg) -> None:
        """Connects to each decoder once when it first appears, so no request pays for it."""
        try:
            beat = _heartbeat_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        peer = (beat.ucx_host, beat.ucx_port)
        if beat.role is Role.PREFILL or beat.worker_id == self.ctx.worker_id or peer in self._warmed:
            return
        self._warmed.add(peer)
        task = asyncio.create_task(self._connect_quietly(*peer))
        self._tasks.append(task)

    async def _connect_quietly(self, host: str, port: int) -> None:
        try:
            await self.sender.connect(host, port)
        except Exception as exc:  # the hand-off itself will retry and report
            self._warmed.discard((host, port))
            log.warning("ucx_warm_up_failed", peer=f"{host}:{port}", error=repr(exc))

    async def _on_cancel(self, msg) -> None:
        try:
            request_id = _cancel_decoder.decode(msg.data).request_id
        except msgspec.DecodeError:
            log.warning("malformed_cancel")
            return
        await self.cancel(request_id)

    async def _admin_cancel(self, body: dict) -> dict:
        request_id = body.get("request_id")
        if not isinstance(request_id, str):
            raise AdminError(400, '"request_id" (a string) is required')
        return {"request_id": request_id, "held": await self.cancel(request_id)}

    async def _status(self, _: dict) -> dict:
        beat = self.heartbeat()
        return {
            "instance": beat.worker_id,
            "kind": "worker",
            "role": beat.role.label,
            "model": beat.model,
            "running": beat.running,
            "waiting": beat.waiting,
            "sessions_in_flight": self.engine.num_sequences,
            "kv_blocks_used": beat.total_kv_blocks - beat.free_kv_blocks,
            "kv_blocks_total": beat.total_kv_blocks,
            "draining": beat.draining,
            "metrics_port": self.metrics_port,
        }

    async def _drain(self, _: dict) -> dict:
        await self.drain()
        return {"instance": self.ctx.worker_id, "draining": True}

    async def drain(self) -> None:
        """Stops taking work; `on_drained` is called once everything in flight is done."""
        if not self.ctx.draining:
            self.ctx.draining = True
            await self._beat()  # leave placement now, not at the next beat
            self._tasks.append(asyncio.create_task(self._finish_then_exit(), name="drain"))
            log.info("draining")

    async def _finish_then_exit(self) -> None:
        while self.ctx.waiting or self.engine.has_unfinished or self.engine.num_sequences or self.prefill.num_handoffs_in_flight:
            await asyncio.sleep(0.1)
        log.info("drained")
        self._on_drained()

    def heartbeat(self) -> Heartbeat:
        ctx = self.ctx
        engine = self.engine
        metrics = ctx.metrics
        metrics.labels(metrics.kv_usage).set(1 - engine.num_free_blocks / engine.num_blocks)
        metrics.labels(metrics.running).set(engine.num_running)
        metrics.labels(metrics.waiting).set(ctx.waiting)
        return Heartbeat(
            worker_id=ctx.worker_id,
            role=ctx.role,
            model=ctx.model.name,
            model_fingerprint=ctx.model.config.fingerprint(),
            ucx_host=self.ucx_host,
            ucx_port=self.receiver.port,
            running=engine.num_running,
            waiting=ctx.waiting,
            free_kv_blocks=engine.num_free_blocks,
            total_kv_blocks=engine.num_blocks,
            queued_prefill_tokens=ctx.queued_prefill_tokens,
            sent_at=time.time(),
            kv_bytes_per_token=engine.kv_bytes_per_token,
            draining=ctx.draining,
            prefill_tokens_per_s=ctx.rates.prefill_tokens_per_s,
            handoff_bytes_per_s=ctx.rates.handoff_bytes_per_s,
            metrics_port=self.metrics_port,
            layout=ctx.layout.describe(),
            incarnation=self.incarnation,
        )

    async def _beat(self) -> None:
        ctx = self.ctx
        await ctx.nc.publish(ctx.subjects.heartbeat(ctx.role.label, ctx.worker_id), protocol.encode(self.heartbeat()))

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self._beat()
            except Exception as exc:  # a NATS reconnect must not end the heartbeat
                log.warning("heartbeat_failed", error=repr(exc))
