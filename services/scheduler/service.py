"""Scheduler service: worker registry from heartbeats, placement over request/reply.

Several schedulers may run: placement requests are load-balanced by a NATS queue
group, and every scheduler sees every heartbeat.
"""

from __future__ import annotations

import msgspec
import structlog
from nats.aio.client import Client as NatsClient

from services.scheduler.policy import Mode, place, record_placement
from services.scheduler.registry import WorkerRegistry
from shared import protocol
from shared.protocol import ErrorCode, Heartbeat, PlaceRequest, Placement, ServiceError
from shared.subjects import PLACE_QUEUE_GROUP, Subjects

log = structlog.get_logger()

_heartbeat_decoder = protocol.decoder(Heartbeat)
_place_decoder = protocol.decoder(PlaceRequest)


class SchedulerService:
    def __init__(self, nc: NatsClient, subjects: Subjects, mode: Mode, registry: WorkerRegistry | None = None):
        self.nc = nc
        self.subjects = subjects
        self.mode = mode
        self.registry = registry or WorkerRegistry()
        self._subscriptions = []

    async def start(self) -> None:
        self._subscriptions = [
            await self.nc.subscribe(self.subjects.all_heartbeats, cb=self._on_heartbeat),
            await self.nc.subscribe(self.subjects.place, queue=PLACE_QUEUE_GROUP, cb=self._on_place),
        ]
        log.info("scheduler_started", mode=self.mode.value)

    async def stop(self) -> None:
        for sub in self._subscriptions:
            await sub.unsubscribe()

    async def _on_heartbeat(self, msg) -> None:
        try:
            self.registry.observe(_heartbeat_decoder.decode(msg.data))
        except msgspec.DecodeError:
            log.warning("malformed_heartbeat", subject=msg.subject)

    async def _on_place(self, msg) -> None:
        try:
            request = _place_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            await msg.respond(protocol.encode(ServiceError(ErrorCode.BAD_REQUEST, f"malformed place request: {exc}")))
            return
        workers = self.registry.alive()
        result = place(request, workers, self.mode)
        if isinstance(result, Placement):
            record_placement(result, request, {w.worker_id: w for w in workers})
            log.info(
                "placed",
                request_id=request.request_id,
                path=result.path.label,
                prefill=result.prefill_worker,
                decode=result.decode_worker,
            )
        else:
            log.warning("placement_failed", request_id=request.request_id, reason=result.message)
        await msg.respond(protocol.encode(result))
