"""Scheduler service: worker registry from heartbeats, placement over request/reply.

Several schedulers may run: placement requests are load-balanced by a NATS queue
group, and every scheduler sees every heartbeat. Admin: `status`, `policy`, `loglevel`.

Failure detection: the registry is swept every SWEEP_INTERVAL_S; a worker silent for
longer than the TTL (or replaced by a new incarnation under its id) is announced on
`<prefix>.events.worker_down`, so gateways migrate or end the requests placed on it
within TTL + 1 s instead of waiting for their stall timeout. Every scheduler announces
it (gateways ignore duplicates). After this scheduler's own NATS outage no worker is
declared dead for the silence: each gets a fresh TTL.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog
from nats.aio.client import Client as NatsClient

from services.scheduler.policy import Policy, place, record_placement
from services.scheduler.readiness import readiness
from services.scheduler.registry import LostWorker, WorkerLoad, WorkerRegistry
from shared import protocol
from shared.admin import AdminError, start_admin
from shared.protocol import ErrorCode, Heartbeat, PlaceRequest, Placement, ReadinessRequest, ServiceError, WorkerDown
from shared.subjects import PLACE_QUEUE_GROUP, Subjects

log = structlog.get_logger()

_heartbeat_decoder = protocol.decoder(Heartbeat)
_place_decoder = protocol.decoder(PlaceRequest)
_ready_decoder = protocol.decoder(ReadinessRequest)

SWEEP_INTERVAL_S = 0.25


def worker_status(load: WorkerLoad, now: float) -> dict:
    beat = load.beat
    used = beat.total_kv_blocks - beat.free_kv_blocks
    return {
        "worker_id": beat.worker_id,
        "role": beat.role.label,
        "model": beat.model,
        "running": beat.running,
        "waiting": beat.waiting,
        "queued_prefill_tokens": beat.queued_prefill_tokens,
        "kv_blocks_used": used,
        "kv_blocks_total": beat.total_kv_blocks,
        "kv_usage": used / beat.total_kv_blocks if beat.total_kv_blocks else 0.0,
        "draining": beat.draining,
        "prefill_tokens_per_s": beat.prefill_tokens_per_s,
        "handoff_bytes_per_s": beat.handoff_bytes_per_s,
        "metrics_port": beat.metrics_port,
        "last_heartbeat_s": round(now - load.seen_at, 3),
    }


class SchedulerService:
    def __init__(self, nc: NatsClient, subjects: Subjects, policy: Policy, instance_id: str, registry: WorkerRegistry | None = None):
        self.nc = nc
        self.subjects = subjects
        self.policy = policy
        self.instance_id = instance_id
        self.registry = registry or WorkerRegistry()
        self.placed = 0
        self._subscriptions = []
        self._admin = None
        self._sweeper: asyncio.Task | None = None
        self._reconnects_seen = 0

    async def start(self) -> None:
        self._subscriptions = [
            await self.nc.subscribe(self.subjects.all_heartbeats, cb=self._on_heartbeat),
            await self.nc.subscribe(self.subjects.place, queue=PLACE_QUEUE_GROUP, cb=self._on_place),
            await self.nc.subscribe(self.subjects.ready, queue=PLACE_QUEUE_GROUP, cb=self._on_ready),
        ]
        # SUB frames leave with the client's next flush; until the server has them, beats and
        # placements published elsewhere pass this instance by. Started means listening.
        await self.nc.flush()
        self._admin = await start_admin(
            self.nc, self.subjects, "scheduler", self.instance_id, {"status": self._status, "policy": self._policy}
        )
        self._reconnects_seen = self.nc.stats["reconnects"]
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="registry-sweep")
        log.info("scheduler_started", instance=self.instance_id, **self.policy.to_json())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._admin is not None:
            await self._admin.stop()
        for sub in self._subscriptions:
            await sub.unsubscribe()

    async def _on_heartbeat(self, msg) -> None:
        try:
            beat = _heartbeat_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("malformed_heartbeat", subject=msg.subject)
            return
        replaced = self.registry.observe(beat)
        if replaced is not None:
            await self._announce_down(replaced)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.sweep()
            except Exception:  # a NATS hiccup must not end failure detection
                log.exception("sweep_failed")

    async def sweep(self) -> None:
        """Announces every worker whose heartbeats stopped (not while NATS itself is away)."""
        if not self.nc.is_connected:
            return
        reconnects = self.nc.stats["reconnects"]
        if reconnects != self._reconnects_seen:
            self._reconnects_seen = reconnects
            self.registry.forgive_silence()
            return
        for lost in self.registry.expire():
            await self._announce_down(lost)

    async def _announce_down(self, lost: LostWorker) -> None:
        log.warning("worker_down", worker=lost.worker_id, incarnation=lost.incarnation, reason=lost.reason)
        event = WorkerDown(lost.worker_id, lost.incarnation, lost.reason)
        await self.nc.publish(self.subjects.worker_down, protocol.encode(event))

    async def _on_place(self, msg) -> None:
        try:
            request = _place_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            await msg.respond(protocol.encode(ServiceError(ErrorCode.BAD_REQUEST, f"malformed place request: {exc}")))
            return
        workers = self.registry.alive()
        result = place(request, workers, self.policy)
        if isinstance(result, Placement):
            self.placed += 1
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

    async def _on_ready(self, msg) -> None:
        try:
            model = _ready_decoder.decode(msg.data).model
        except msgspec.DecodeError as exc:
            await msg.respond(protocol.encode(ServiceError(ErrorCode.BAD_REQUEST, f"malformed readiness request: {exc}")))
            return
        await msg.respond(protocol.encode(readiness(model, self.registry.alive(), self.policy.mode)))

    async def _status(self, _: dict) -> dict:
        now = time.monotonic()
        workers = sorted(self.registry.alive(), key=lambda w: w.worker_id)
        return {
            "instance": self.instance_id,
            "kind": "scheduler",
            "policy": self.policy.to_json(),
            "placed": self.placed,
            "workers": [worker_status(w, now) for w in workers],
        }

    async def _policy(self, body: dict) -> dict:
        """Without "set": the policy; with {"set": {key: value}}: changes it, then returns it."""
        changes = body.get("set") or {}
        if not isinstance(changes, dict):
            raise AdminError(400, '"set" must be an object of policy keys to values')
        try:
            self.policy = self.policy.updated(changes)
        except ValueError as exc:
            raise AdminError(400, str(exc)) from None
        if changes:
            log.info("policy_changed", **self.policy.to_json())
        return self.policy.to_json()
