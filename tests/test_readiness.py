"""/health readiness: which workers each mode needs (pure), and the gateway's probe against a
real scheduler over a real nats-server (answers, missing parts, the short cache)."""

import nats
import pytest

from services.gateway.readiness import ReadinessProbe
from services.scheduler.policy import Mode, Policy
from services.scheduler.readiness import readiness
from services.scheduler.registry import WorkerLoad
from services.scheduler.service import SchedulerService
from shared import protocol
from shared.protocol import Heartbeat, Role
from shared.subjects import Subjects
from tests.test_scheduler_service import until

SUBJECTS = Subjects("pdready")


def beat(worker_id: str, role: Role, model: str = "m", draining: bool = False) -> Heartbeat:
    return Heartbeat(worker_id, role, model, "fp", "127.0.0.1", 1, 0, 0, 100, 100, 0, 0.0, draining=draining)


def loads(*beats: Heartbeat) -> list[WorkerLoad]:
    return [WorkerLoad(b, seen_at=0.0) for b in beats]


@pytest.mark.parametrize(
    "mode, roles, missing",
    [
        (Mode.DISAGG, [], ["prefill worker", "decode worker"]),
        (Mode.DISAGG, [Role.PREFILL], ["decode worker"]),
        (Mode.DISAGG, [Role.DECODE], ["prefill worker"]),
        (Mode.DISAGG, [Role.PREFILL, Role.DECODE], []),
        (Mode.DISAGG, [Role.BOTH], []),  # a both worker runs either phase
        (Mode.COLOCATED, [Role.PREFILL, Role.DECODE], ["colocated (role=both) worker"]),
        (Mode.COLOCATED, [Role.BOTH], []),
        (Mode.AUTO, [Role.PREFILL], ["decode worker"]),
        (Mode.AUTO, [Role.DECODE], []),
    ],
)
def test_each_mode_needs_its_workers(mode, roles, missing):
    result = readiness("m", loads(*(beat(f"w{i}", role) for i, role in enumerate(roles))), mode)
    assert result.missing == missing
    assert result.ready is (not missing)


def test_draining_workers_and_other_models_do_not_count():
    workers = loads(beat("p0", Role.PREFILL), beat("d0", Role.DECODE, draining=True), beat("d1", Role.DECODE, model="other"))
    result = readiness("m", workers, Mode.DISAGG)
    assert result.missing == ["decode worker"]
    assert (result.prefill_workers, result.decode_workers) == (1, 0)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_probe_reports_what_is_missing_until_the_workers_beat(nats_server):
    gateway_nc, scheduler_nc = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    clock = Clock()
    probe = ReadinessProbe(gateway_nc, SUBJECTS, "m", ttl_s=1.0, clock=clock)
    try:
        report = await probe.report()
        assert report.status == 503 and report.body["missing"] == ["scheduler"]
        assert "no scheduler is running" in report.body["detail"]

        scheduler = SchedulerService(scheduler_nc, SUBJECTS, Policy(mode=Mode.DISAGG), "s0")
        await scheduler.start()
        assert (await probe.report()).body["missing"] == ["scheduler"]  # cached for a second
        clock.now += 1.5
        report = await probe.report()
        assert report.status == 503 and report.body["missing"] == ["prefill worker", "decode worker"]
        assert report.body["mode"] == "disagg"

        for worker in (beat("p0", Role.PREFILL), beat("d0", Role.DECODE)):
            await gateway_nc.publish(SUBJECTS.heartbeat(worker.role.label, worker.worker_id), protocol.encode(worker))
        await gateway_nc.flush()
        await until(lambda: len(scheduler.registry.alive()) == 2)
        clock.now += 1.5
        report = await probe.report()
        assert report.status == 200
        assert report.body == {"status": "ready", "model": "m", "mode": "disagg", "workers": {"prefill": 1, "decode": 1, "both": 0}}
        await scheduler.stop()
    finally:
        await gateway_nc.close()
        await scheduler_nc.close()


async def test_probe_without_nats_says_so(nats_server):
    nc = await nats.connect(nats_server.url)
    await nc.close()
    report = await ReadinessProbe(nc, SUBJECTS, "m").report()
    assert report.status == 503 and report.body["missing"] == ["nats"]
