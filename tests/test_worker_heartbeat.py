"""A worker beats on its interval and soon after requests leave it (fresh load for placement).

Between beats the scheduler adds its own placements to a worker's load but cannot see what
finished; a worker that beat last then looks lightest and herds requests onto itself
(docs/planner.md). The beat loop runs here alone, with the interval made far longer than the
test, so any beat it sends came from a request leaving.
"""

import asyncio

import services.worker.service as service_module
from services.scheduler.registry import LOAD_BEAT_GAP_S
from services.worker.service import WorkerService


async def test_requests_leaving_trigger_one_beat_for_the_burst(monkeypatch):
    monkeypatch.setattr(service_module, "HEARTBEAT_INTERVAL_S", 60.0)
    beats: list[float] = []
    got_one = asyncio.Event()
    worker = WorkerService.__new__(WorkerService)  # only the beat loop's state
    worker._load_dropped = asyncio.Event()

    async def beat() -> None:
        beats.append(asyncio.get_running_loop().time())
        got_one.set()

    worker._beat = beat
    loop = asyncio.create_task(worker._beat_forever())
    try:
        await asyncio.sleep(0.3)
        assert beats == []  # nothing left, and the interval is a minute away
        for _ in range(3):  # a burst of requests ending together
            worker._load_dropped.set()
        await asyncio.wait_for(got_one.wait(), 10)
        await asyncio.sleep(3 * LOAD_BEAT_GAP_S)
        assert len(beats) == 1  # the burst's ends share one beat
        got_one.clear()
        worker._load_dropped.set()  # a later end beats again
        await asyncio.wait_for(got_one.wait(), 10)
        assert len(beats) == 2
    finally:
        loop.cancel()
