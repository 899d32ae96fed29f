"""Failure detection: the registry's expiry and incarnations, and worker-down events over a real nats-server."""

import asyncio
import time

import nats

from services.scheduler.policy import Mode, Policy, place
from services.scheduler.registry import WORKER_TTL_S, WorkerLoad, WorkerRegistry
from services.scheduler.service import SchedulerService
from shared import protocol
from shared.protocol import Heartbeat, PlaceRequest, Role, WorkerDown
from shared.subjects import Subjects

SUBJECTS = Subjects("pdfault")


def beat(worker_id: str, role: Role = Role.DECODE, incarnation: str = "a") -> Heartbeat:
    return Heartbeat(worker_id, role, "m", "fp", "127.0.0.1", 1, 0, 0, 100, 100, 0, 0.0, incarnation=incarnation)


def test_a_silent_worker_expires_once_and_is_reported():
    now = [0.0]
    registry = WorkerRegistry(ttl_s=3.0, clock=lambda: now[0])
    registry.observe(beat("d0"))
    now[0] = 2.9
    assert registry.expire() == [] and [w.worker_id for w in registry.alive()] == ["d0"]
    now[0] = 3.2
    assert registry.alive() == []  # no longer placeable, even before the sweep
    lost = registry.expire()
    assert [(w.worker_id, w.incarnation) for w in lost] == [("d0", "a")]
    assert "3.2s" in lost[0].reason
    assert registry.expire() == []  # reported once


def test_a_restart_under_the_same_id_reports_the_old_incarnation():
    registry = WorkerRegistry()
    assert registry.observe(beat("d0", incarnation="a")) is None
    assert registry.observe(beat("d0", incarnation="a")) is None
    replaced = registry.observe(beat("d0", incarnation="b"))
    assert (replaced.worker_id, replaced.incarnation) == ("d0", "a")
    assert registry.get("d0").incarnation == "b"


def test_placement_avoids_the_workers_a_migration_names():
    workers = [WorkerLoad(beat("p0", Role.PREFILL), 0.0), WorkerLoad(beat("d0"), 0.0), WorkerLoad(beat("d1"), 0.0)]
    placement = place(PlaceRequest("r", "m", 10, 5, exclude=["d0"]), workers, Policy(mode=Mode.DISAGG))
    assert placement.decode_worker == "d1"
    assert placement.decode_incarnation == "a"


async def test_worker_down_is_published_within_ttl_plus_one_second(nats_server):
    scheduler_nc, client = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    scheduler = SchedulerService(scheduler_nc, SUBJECTS, Policy(), "s0")
    await scheduler.start()
    downs: list[tuple[WorkerDown, float]] = []

    async def on_down(msg):
        downs.append((protocol.decoder(WorkerDown).decode(msg.data), time.monotonic()))

    await client.subscribe(SUBJECTS.worker_down, cb=on_down)
    for _ in range(2):  # a worker beating every 0.5 s, then silent
        await client.publish(SUBJECTS.heartbeat("decode", "d0"), protocol.encode(beat("d0")))
        await client.flush()
        last_beat = time.monotonic()
        await asyncio.sleep(0.5)
    deadline = last_beat + WORKER_TTL_S + 1.0
    while not downs and time.monotonic() < deadline + 1.0:
        await asyncio.sleep(0.05)

    assert [(d.worker_id, d.incarnation) for d, _ in downs] == [("d0", "a")]
    assert downs[0][1] <= deadline, f"worker-down after {downs[0][1] - last_beat:.2f}s of silence"

    # Back as a new incarnation: the old one is reported at once, not a TTL later.
    await client.publish(SUBJECTS.heartbeat("decode", "d0"), protocol.encode(beat("d0", incarnation="b")))
    await client.publish(SUBJECTS.heartbeat("decode", "d0"), protocol.encode(beat("d0", incarnation="c")))
    await client.flush()
    reported_at_once = time.monotonic() + 2.0  # well inside a TTL: no sweep could have reported it
    while len(downs) < 2 and time.monotonic() < reported_at_once:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # a second report, if any, would arrive now
    assert [(d.worker_id, d.incarnation) for d, _ in downs[1:]] == [("d0", "b")]
    await scheduler.stop()
    await scheduler_nc.close()
    await client.close()


async def test_no_worker_is_declared_dead_for_the_schedulers_own_outage():
    class Disconnected:
        is_connected = False
        stats = {"reconnects": 0}

    now = [0.0]
    registry = WorkerRegistry(clock=lambda: now[0])
    registry.observe(beat("d0"))
    nc = Disconnected()
    scheduler = SchedulerService(nc, SUBJECTS, Policy(), "s0", registry=registry)
    now[0] = 10.0
    await scheduler.sweep()  # NATS is away: nothing is judged
    nc.is_connected, nc.stats["reconnects"] = True, 1
    await scheduler.sweep()  # back: every worker gets a fresh TTL
    assert registry.expire() == []
    now[0] = 12.0
    assert [w.worker_id for w in registry.alive()] == ["d0"]
