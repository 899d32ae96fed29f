"""A worker process: engine + NATS control + UCX data, for role prefill, decode or both."""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog
from nats.aio.client import Client as NatsClient

from services.decode.handler import DecodeHandler
from services.prefill.handler import PrefillHandler
from services.scheduler.registry import HEARTBEAT_INTERVAL_S
from services.worker.context import WorkerContext, finish_reason
from services.worker.engine_loop import EngineLoop
from services.worker.streams import TokenStreams
from shared import protocol
from shared.engine.engine import Engine, TokenOutput
from shared.engine.loader import LoadedModel
from shared.protocol import CancelRequest, Heartbeat, Role
from shared.subjects import Subjects
from shared.transport.ucx_kv import KvReceiver, KvSender

log = structlog.get_logger()

_cancel_decoder = protocol.decoder(CancelRequest)


class WorkerService:
    def __init__(
        self,
        nc: NatsClient,
        subjects: Subjects,
        worker_id: str,
        role: Role,
        model: LoadedModel,
        engine: Engine,
        ucx_host: str = "127.0.0.1",
    ):
        self.ucx_host = ucx_host
        self.ctx = WorkerContext(
            nc=nc,
            subjects=subjects,
            worker_id=worker_id,
            role=role,
            model=model,
            engine_loop=EngineLoop(engine, self._on_tokens),
            streams=TokenStreams(nc, worker_id),
            kv_dtype=engine.kv_dtype,
        )
        self.receiver = KvReceiver(ucx_host)
        self.sender = KvSender()
        self._subscriptions = []
        self._heartbeat: asyncio.Task | None = None

    @property
    def engine(self) -> Engine:
        return self.ctx.engine_loop.engine

    async def start(self) -> None:
        ctx = self.ctx
        await self.receiver.start()
        ctx.engine_loop.start()
        subjects = ctx.subjects
        if ctx.role in (Role.PREFILL, Role.BOTH):
            prefill = PrefillHandler(ctx, self.sender)
            self._subscriptions.append(await ctx.nc.subscribe(subjects.worker_prefill(ctx.worker_id), cb=prefill.on_job))
        if ctx.role in (Role.DECODE, Role.BOTH):
            decode = DecodeHandler(ctx, self.receiver, self.ucx_host)
            self._subscriptions.append(await ctx.nc.subscribe(subjects.worker_decode(ctx.worker_id), cb=decode.on_job))
        self._subscriptions.append(await ctx.nc.subscribe(subjects.worker_cancel(ctx.worker_id), cb=self._on_cancel))
        await self._beat()  # be placeable at once, not one interval later
        self._heartbeat = asyncio.create_task(self._beat_forever(), name="heartbeat")
        log.info("worker_started", worker_id=ctx.worker_id, role=ctx.role.label, model=ctx.model.name, ucx_port=self.receiver.port)

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for sub in self._subscriptions:
            await sub.unsubscribe()
        await self.ctx.engine_loop.stop()
        await self.sender.close()
        await self.receiver.close()

    async def _on_tokens(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            reason = finish_reason(out.finish_reason)
            await self.ctx.streams.publish(out.request_id, [out.token_id], reason)
            if reason is not None:
                await self.ctx.engine_loop.call(self.engine.free, out.request_id)

    async def _on_cancel(self, msg) -> None:
        try:
            request_id = _cancel_decoder.decode(msg.data).request_id
        except msgspec.DecodeError:
            log.warning("malformed_cancel")
            return
        self.ctx.streams.close(request_id)
        self.ctx.cancelled.add(request_id)
        await self.ctx.engine_loop.call(self.engine.abort, request_id)
        log.info("cancelled", request_id=request_id)

    def heartbeat(self) -> Heartbeat:
        ctx = self.ctx
        return Heartbeat(
            worker_id=ctx.worker_id,
            role=ctx.role,
            model=ctx.model.name,
            model_fingerprint=ctx.model.config.fingerprint(),
            ucx_host=self.ucx_host,
            ucx_port=self.receiver.port,
            running=self.engine.num_running,
            waiting=ctx.waiting,
            free_kv_blocks=self.engine.num_free_blocks,
            total_kv_blocks=self.engine.num_blocks,
            queued_prefill_tokens=ctx.queued_prefill_tokens,
            sent_at=time.time(),
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
