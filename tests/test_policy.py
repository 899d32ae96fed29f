"""Placement policy: pure function, no NATS."""

import pytest

from services.scheduler.policy import Mode, place, record_placement
from services.scheduler.registry import WorkerLoad, WorkerRegistry
from shared.protocol import Heartbeat, Path, PlaceRequest, Placement, Role, ServiceError


def beat(worker_id: str, role: Role, model: str = "m", running: int = 0, queued: int = 0, free_blocks: int = 100) -> Heartbeat:
    return Heartbeat(worker_id, role, model, "fp", "127.0.0.1", 1, running, 0, free_blocks, 100, queued, 0.0)


def loads(*beats: Heartbeat) -> list[WorkerLoad]:
    return [WorkerLoad(b, seen_at=0.0) for b in beats]


REQUEST = PlaceRequest("r1", "m", num_prompt_tokens=100, max_tokens=10)


def test_disagg_picks_least_loaded_prefill_and_decode():
    workers = loads(
        beat("p0", Role.PREFILL, queued=500),
        beat("p1", Role.PREFILL, queued=10),
        beat("d0", Role.DECODE, running=3),
        beat("d1", Role.DECODE, running=1),
    )
    result = place(REQUEST, workers, Mode.DISAGG)
    assert result == Placement("r1", Path.DISAGG, "p1", "d1")


def test_colocated_uses_only_both_workers():
    workers = loads(beat("p0", Role.PREFILL), beat("b0", Role.BOTH, running=2), beat("b1", Role.BOTH, running=0))
    result = place(REQUEST, workers, Mode.COLOCATED)
    assert result == Placement("r1", Path.COLOCATED, "b1", "b1")


@pytest.mark.parametrize(
    "workers, mode",
    [
        ([], Mode.DISAGG),
        ([beat("p0", Role.PREFILL)], Mode.DISAGG),
        ([beat("d0", Role.DECODE)], Mode.DISAGG),
        ([beat("p0", Role.PREFILL), beat("d0", Role.DECODE)], Mode.COLOCATED),
        ([beat("p0", Role.PREFILL, model="other"), beat("d0", Role.DECODE, model="other")], Mode.DISAGG),
    ],
)
def test_unavailable_when_no_suitable_worker(workers, mode):
    result = place(REQUEST, [WorkerLoad(b, 0.0) for b in workers], mode)
    assert isinstance(result, ServiceError)
    assert result.code == 503


def test_placements_spread_before_the_next_heartbeat():
    workers = loads(beat("p0", Role.PREFILL), beat("p1", Role.PREFILL), beat("d0", Role.DECODE), beat("d1", Role.DECODE))
    by_id = {w.worker_id: w for w in workers}
    chosen = []
    for i in range(4):
        request = PlaceRequest(f"r{i}", "m", 100, 10)
        placement = place(request, workers, Mode.DISAGG)
        record_placement(placement, request, by_id)
        chosen.append((placement.prefill_worker, placement.decode_worker))
    assert sorted(chosen) == [("p0", "d0"), ("p0", "d0"), ("p1", "d1"), ("p1", "d1")]


def test_registry_expires_silent_workers():
    now = [0.0]
    registry = WorkerRegistry(ttl_s=3.0, clock=lambda: now[0])
    registry.observe(beat("p0", Role.PREFILL))
    now[0] = 2.9
    assert [w.worker_id for w in registry.alive()] == ["p0"]
    now[0] = 3.1
    assert registry.alive() == []
    registry.observe(beat("p0", Role.PREFILL))
    assert [w.worker_id for w in registry.alive()] == ["p0"]


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError) as excinfo:
        Mode.parse("sideways")
    assert "disagg" in str(excinfo.value) and "colocated" in str(excinfo.value)
