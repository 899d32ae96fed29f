"""The scheduler service over a real nats-server: queue-grouped placement, expiring workers."""

import asyncio

import nats

from services.scheduler.policy import Mode, Policy
from services.scheduler.service import SchedulerService
from shared import protocol
from shared.protocol import Heartbeat, PlaceReply, PlaceRequest, Placement, Role
from shared.subjects import Subjects

SUBJECTS = Subjects("pdtest")


async def until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def beat(worker_id: str, role: Role) -> Heartbeat:
    return Heartbeat(worker_id, role, "m", "fp", "127.0.0.1", 1, 0, 0, 100, 100, 0, 0.0)


async def test_two_schedulers_place_each_request_exactly_once(nats_server):
    connections = [await nats.connect(nats_server.url) for _ in range(3)]
    schedulers = [SchedulerService(nc, SUBJECTS, Policy(mode=Mode.DISAGG), f"s{i}") for i, nc in enumerate(connections[:2])]
    for scheduler in schedulers:
        await scheduler.start()
    client = connections[2]

    async def beat_forever():  # as real workers do: a loaded machine may stall past one heartbeat timeout
        while True:
            for worker in (beat("p0", Role.PREFILL), beat("d0", Role.DECODE)):
                await client.publish(SUBJECTS.heartbeat(worker.role.label, worker.worker_id), protocol.encode(worker))
            await client.flush()
            await asyncio.sleep(0.5)

    beating = asyncio.create_task(beat_forever())
    await until(lambda: all(len(s.registry.alive()) == 2 for s in schedulers))  # both saw both heartbeats

    replies = []
    inbox = client.new_inbox()

    async def collect(msg):
        replies.append(protocol.decoder(PlaceReply).decode(msg.data))

    await client.subscribe(inbox, cb=collect)
    for i in range(20):
        await client.publish(SUBJECTS.place, protocol.encode(PlaceRequest(f"r{i}", "m", 10, 4)), reply=inbox)
    await until(lambda: len(replies) >= 20)
    await asyncio.sleep(0.2)  # a duplicate answer, if any, would arrive now

    assert sorted(r.request_id for r in replies) == sorted(f"r{i}" for i in range(20))  # one answer each
    assert all(isinstance(r, Placement) for r in replies)
    assert sum(s.placed for s in schedulers) == 20
    assert all(s.placed > 0 for s in schedulers)  # the queue group spreads the work
    beating.cancel()
    for scheduler in schedulers:
        await scheduler.stop()
    for nc in connections:
        await nc.close()
