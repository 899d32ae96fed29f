"""The dispatcher's I/O around migration, against a fake NATS (placements and jobs scripted)."""

import asyncio
from dataclasses import dataclass

import pytest

from services.gateway.dispatcher import Dispatcher
from services.gateway.openai_schema import RequestError
from shared import protocol
from shared.protocol import (
    CancelRequest,
    ErrorCode,
    FinishReason,
    JobAccepted,
    Path,
    PlaceRequest,
    Placement,
    PrefillJob,
    Sampling,
    ServiceError,
    TokenEvent,
    WorkerDown,
)
from shared.subjects import Subjects

SUBJECTS = Subjects("pd")


@dataclass
class Msg:
    subject: str
    data: bytes


class Subscription:
    def __init__(self, nats: "FakeNats", subject: str, cb):
        self.nats, self.subject, self.cb = nats, subject, cb

    async def unsubscribe(self) -> None:
        self.nats.subscriptions.remove(self)


class FakeNats:
    """Answers placements from `decoders` (in order, skipping avoided ones) and accepts jobs."""

    def __init__(self, decoders: list[str], prefills: list[str] = ("p0",)):
        self.decoders = list(decoders)
        self.prefills = list(prefills)
        self.refusing: set[str] = set()
        self.subscriptions: list[Subscription] = []
        self.published: list[tuple[str, bytes]] = []
        self.jobs: list[PrefillJob] = []
        self.places: list[PlaceRequest] = []
        self.stats = {"reconnects": 0}

    async def subscribe(self, subject, cb=None, queue=None):
        subscription = Subscription(self, subject, cb)
        self.subscriptions.append(subscription)
        return subscription

    async def publish(self, subject, payload):
        self.published.append((subject, payload))

    async def request(self, subject, payload, timeout):
        if subject == SUBJECTS.place:
            request = protocol.decoder(PlaceRequest).decode(payload)
            self.places.append(request)
            decoders = [d for d in self.decoders if d not in request.exclude]
            prefills = [p for p in self.prefills if p not in request.exclude]
            if not decoders or not prefills:
                return Msg(subject, protocol.encode(ServiceError(ErrorCode.UNAVAILABLE, "no live decode worker")))
            reply = Placement(request.request_id, Path.DISAGG, prefills[0], decoders[0], decode_incarnation="i1")
            return Msg(subject, protocol.encode(reply))
        job = protocol.decoder(PrefillJob).decode(payload)
        worker = subject.split(".")[2]
        if worker in self.refusing:
            return Msg(subject, protocol.encode(ServiceError(ErrorCode.UNAVAILABLE, f"worker {worker} is draining")))
        self.jobs.append(job)
        return Msg(subject, protocol.encode(JobAccepted(worker)))

    async def deliver(self, subject: str, message) -> None:
        for subscription in [s for s in self.subscriptions if s.subject == subject]:
            await subscription.cb(Msg(subject, protocol.encode(message)))

    async def send_tokens(self, worker: str, ids: list[int], finish: FinishReason | None = None) -> None:
        request_id = self.jobs[-1].request_id
        await self.deliver(SUBJECTS.stream(request_id), TokenEvent(request_id, worker, ids, finish))

    def cancels(self) -> list[tuple[str, str]]:
        decode = protocol.decoder(CancelRequest)
        return [(s.split(".")[2], decode.decode(p).request_id) for s, p in self.published if s.endswith(".cancel")]


async def start(nats: FakeNats, limit: int = 3):
    dispatcher = Dispatcher(nats, SUBJECTS, stall_timeout_s=5.0, migration_limit=limit)
    await dispatcher.start()
    dispatched = await dispatcher.dispatch("req", "m", [1, 2, 3], Sampling(max_tokens=6))
    received: list[int] = []

    async def consume():
        try:
            async for event in dispatched.events:
                received.extend(event.token_ids)
                if event.finish_reason is not None:
                    return event
        finally:
            await dispatched.events.aclose()  # as the gateway does: ends the attempt's subscription

    return dispatcher, dispatched, received, asyncio.create_task(consume())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_dead_decoder_is_replaced_and_the_stream_goes_on():
    nats = FakeNats(["d0", "d1"])
    dispatcher, dispatched, received, consumer = await start(nats)
    await nats.send_tokens("p0", [10])
    await nats.send_tokens("d0", [11])
    await settle()
    nats.decoders.remove("d0")  # the scheduler forgot it too
    await nats.deliver(SUBJECTS.worker_down, WorkerDown("d0", "i1", "no heartbeat for 3.1s"))
    await settle()

    assert [job.request_id for job in nats.jobs] == ["req", "req-m1"]
    assert nats.jobs[1].prompt_ids == [1, 2, 3, 10, 11]
    assert nats.jobs[1].sampling.max_tokens == 4 and nats.jobs[1].sampling.step_offset == 2
    assert ("d0", "req") in nats.cancels() and ("p0", "req") in nats.cancels()
    assert dispatched.placement.decode_worker == "d1" and dispatched.migrations == 1

    await nats.send_tokens("p0", [12])
    await nats.send_tokens("d1", [13, 14, 15], FinishReason.LENGTH)
    final = await asyncio.wait_for(consumer, 10)
    assert final.finish_reason is FinishReason.LENGTH
    assert received == [10, 11, 12, 13, 14, 15]
    assert [s.subject for s in nats.subscriptions] == [SUBJECTS.worker_down]  # the attempts' streams are closed
    await dispatcher.stop()


async def test_tokens_from_a_worker_not_placed_never_reach_the_client():
    nats = FakeNats(["d0"])
    dispatcher, _, received, consumer = await start(nats)
    await nats.send_tokens("p0", [10])
    await nats.send_tokens("intruder", [666])
    await nats.send_tokens("d0", [11], FinishReason.STOP)
    await asyncio.wait_for(consumer, 10)
    assert received == [10, 11]
    await dispatcher.stop()


async def test_a_refused_job_is_placed_elsewhere():
    nats = FakeNats(["d0"], prefills=["p0", "p1"])
    nats.refusing.add("p0")
    dispatcher, dispatched, _, consumer = await start(nats)
    assert dispatched.placement.prefill_worker == "p1"
    assert nats.places[-1].exclude == ["p0"]
    consumer.cancel()
    await dispatcher.stop()


async def test_no_worker_left_ends_with_503():
    nats = FakeNats(["d0"])
    dispatcher, _, received, consumer = await start(nats)
    await nats.send_tokens("p0", [10])
    nats.decoders.clear()
    await nats.deliver(SUBJECTS.worker_down, WorkerDown("d0", "i1", "gone"))
    with pytest.raises(RequestError) as raised:
        await asyncio.wait_for(consumer, 10)
    assert raised.value.status == 503
    assert "d0 failed: gone" in raised.value.message and "no live decode worker" in raised.value.message
    assert received == [10]
    await dispatcher.stop()


async def test_a_nats_reconnect_migrates_requests_in_flight():
    nats = FakeNats(["d0", "d1"])
    dispatcher, _, _, consumer = await start(nats)
    await nats.send_tokens("p0", [10])
    nats.stats["reconnects"] += 1
    for _ in range(100):  # the dispatcher notices reconnects by polling; a loaded machine may take a while
        if len(nats.jobs) >= 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # a second migration, if any, would be sent now
    assert [job.request_id for job in nats.jobs] == ["req", "req-m1"]
    assert nats.jobs[1].prompt_ids == [1, 2, 3, 10]
    consumer.cancel()
    await dispatcher.stop()


async def test_interrupt_all_ends_every_request_and_cancels_it_on_its_workers():
    nats = FakeNats(["d0"])
    dispatcher, _, _, consumer = await start(nats)
    assert dispatcher.interrupt_all("shutting down") == 1
    final = await asyncio.wait_for(consumer, 10)
    assert final.finish_reason is FinishReason.CANCELLED and final.error == "shutting down"
    assert ("p0", "req") in nats.cancels()
    await dispatcher.stop()
