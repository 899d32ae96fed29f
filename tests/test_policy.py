"""Placement policy: pure function, no NATS."""

import msgspec
import pytest

from services.scheduler.policy import Mode, Policy, estimate_ttft, place, record_placement
from services.scheduler.registry import WorkerLoad, WorkerRegistry
from shared.protocol import Heartbeat, Path, PlaceRequest, Placement, Role, ServiceError


def beat(worker_id: str, role: Role, model: str = "m", running: int = 0, queued: int = 0, free_blocks: int = 100,
         waiting: int = 0, draining: bool = False) -> Heartbeat:
    return Heartbeat(worker_id, role, model, "fp", "127.0.0.1", 1, running, waiting, free_blocks, 100, queued, 0.0,
                     kv_bytes_per_token=1000, draining=draining)


DISAGG = Policy(mode=Mode.DISAGG)
COLOCATED = Policy(mode=Mode.COLOCATED)
AUTO = Policy(mode=Mode.AUTO, remote_min_prompt_tokens=256, prefill_tokens_per_s=1000.0, handoff_bytes_per_s=1e9)


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
    result = place(REQUEST, workers, DISAGG)
    assert result == Placement("r1", Path.DISAGG, "p1", "d1")


def test_colocated_uses_only_both_workers():
    workers = loads(beat("p0", Role.PREFILL), beat("b0", Role.BOTH, running=2), beat("b1", Role.BOTH, running=0))
    result = place(REQUEST, workers, COLOCATED)
    assert result == Placement("r1", Path.COLOCATED, "b1", "b1")


@pytest.mark.parametrize(
    "workers, policy",
    [
        ([], DISAGG),
        ([beat("p0", Role.PREFILL)], DISAGG),
        ([beat("d0", Role.DECODE)], DISAGG),
        ([beat("p0", Role.PREFILL), beat("d0", Role.DECODE)], COLOCATED),
        ([beat("p0", Role.PREFILL, model="other"), beat("d0", Role.DECODE, model="other")], DISAGG),
        ([beat("p0", Role.PREFILL, draining=True), beat("d0", Role.DECODE)], DISAGG),
    ],
)
def test_unavailable_when_no_suitable_worker(workers, policy):
    result = place(REQUEST, [WorkerLoad(b, 0.0) for b in workers], policy)
    assert isinstance(result, ServiceError)
    assert result.code == 503


def test_placements_spread_before_the_next_heartbeat():
    workers = loads(beat("p0", Role.PREFILL), beat("p1", Role.PREFILL), beat("d0", Role.DECODE), beat("d1", Role.DECODE))
    by_id = {w.worker_id: w for w in workers}
    chosen = []
    for i in range(4):
        request = PlaceRequest(f"r{i}", "m", 100, 10)
        placement = place(request, workers, DISAGG)
        record_placement(placement, request, by_id)
        chosen.append((placement.prefill_worker, placement.decode_worker))
    assert sorted(chosen) == [("p0", "d0"), ("p0", "d0"), ("p1", "d1"), ("p1", "d1")]


def rated(heartbeat: Heartbeat, prefill_tokens_per_s: float) -> Heartbeat:
    return msgspec.structs.replace(heartbeat, prefill_tokens_per_s=prefill_tokens_per_s)


def test_prompt_tokens_prefilled_since_the_beat_are_not_counted_as_queued():
    """The worker that beat last must not look lightest only because the others' beats are older."""
    now = [0.0]
    registry = WorkerRegistry(clock=lambda: now[0])
    registry.observe(rated(beat("p0", Role.PREFILL, queued=1000), prefill_tokens_per_s=2000))
    now[0] = 0.4
    registry.observe(rated(beat("p1", Role.PREFILL, queued=500), prefill_tokens_per_s=2000))
    registry.observe(beat("d0", Role.DECODE))
    by_id = {w.worker_id: w for w in registry.alive()}
    assert by_id["p0"].queued_prefill_tokens == 200  # 1000 - 0.4 s x 2000 tokens/s
    assert by_id["p1"].queued_prefill_tokens == 500  # just beat: as reported
    placement = place(REQUEST, registry.alive(), DISAGG)
    assert placement.prefill_worker == "p0"
    record_placement(placement, REQUEST, by_id)
    now[0] = 0.45
    assert {w.worker_id: w.queued_prefill_tokens for w in registry.alive()} == {"p0": 200, "p1": 400, "d0": 0}


def test_a_placement_drains_only_from_when_it_was_placed():
    now = [0.0]
    registry = WorkerRegistry(clock=lambda: now[0])
    registry.observe(rated(beat("p0", Role.PREFILL, queued=0), prefill_tokens_per_s=1000))
    now[0] = 0.5  # half a second of idle drain must not swallow what comes next
    [load] = registry.alive()
    record_placement(Placement("r1", Path.DISAGG, "p0", "d0"), REQUEST, {"p0": load})
    assert registry.alive()[0].queued_prefill_tokens == 100
    now[0] = 0.55
    assert registry.alive()[0].queued_prefill_tokens == 50


def test_a_silent_worker_drains_for_one_beat_interval_at_most():
    """A worker that stopped beating may be stuck: its queue must not come to look empty."""
    now = [0.0]
    registry = WorkerRegistry(clock=lambda: now[0])
    registry.observe(rated(beat("p0", Role.PREFILL, queued=5000), prefill_tokens_per_s=1000))
    now[0] = 2.5  # still inside the TTL
    assert registry.alive()[0].queued_prefill_tokens == 4000


def test_colocated_prefers_the_shortest_prefill_backlog_then_the_fewest_streams():
    workers = loads(beat("b0", Role.BOTH, running=1, queued=800), beat("b1", Role.BOTH, running=6), beat("b2", Role.BOTH, running=4))
    assert place(REQUEST, workers, COLOCATED).prefill_worker == "b2"  # no backlog; fewer streams than b1


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


def auto_request(num_prompt_tokens: int) -> PlaceRequest:
    return PlaceRequest("r", "m", num_prompt_tokens=num_prompt_tokens, max_tokens=10)


def test_auto_prefills_short_prompts_locally_and_long_ones_remotely():
    workers = loads(beat("p0", Role.PREFILL), beat("d0", Role.DECODE))
    short = place(auto_request(40), workers, AUTO)
    long = place(auto_request(4000), workers, AUTO)
    assert short == Placement("r", Path.COLOCATED, "d0", "d0")
    assert long == Placement("r", Path.DISAGG, "p0", "d0")


def test_auto_follows_its_thresholds():
    workers = loads(beat("p0", Role.PREFILL), beat("d0", Role.DECODE))
    never_remote = AUTO.updated({"remote_min_prompt_tokens": "100000"})
    assert place(auto_request(4000), workers, never_remote).path is Path.COLOCATED
    # A slow link makes the hand-off cost more than the faster prefill saves.
    slow_link = AUTO.updated({"handoff_bytes_per_s": 1e5})
    assert place(auto_request(4000), workers, slow_link).path is Path.COLOCATED


def test_auto_avoids_a_busy_prefill_pool():
    idle = loads(beat("p0", Role.PREFILL), beat("d0", Role.DECODE))
    busy = loads(beat("p0", Role.PREFILL, queued=50_000), beat("d0", Role.DECODE))
    assert place(auto_request(4000), idle, AUTO).path is Path.DISAGG
    assert place(auto_request(4000), busy, AUTO).path is Path.COLOCATED


def test_ttft_estimate_charges_queue_and_transfer():
    prefill, decode = loads(beat("p0", Role.PREFILL, queued=1000), beat("d0", Role.DECODE))
    estimate = estimate_ttft(auto_request(1000), prefill, decode, AUTO)
    assert estimate.remote_s == pytest.approx(2000 / 1000 + 1000 * 1000 / 1e9 + AUTO.handoff_overhead_s)
    assert estimate.local_s == pytest.approx(1000 / (1000 * AUTO.local_prefill_efficiency))


def test_full_queues_are_429_not_503():
    full = DISAGG.max_waiting_per_worker
    workers = loads(beat("p0", Role.PREFILL, waiting=full), beat("d0", Role.DECODE, waiting=full))
    result = place(REQUEST, workers, DISAGG)
    assert isinstance(result, ServiceError) and result.code == 429
    one_open = loads(beat("p0", Role.PREFILL, waiting=full), beat("p1", Role.PREFILL), beat("d0", Role.DECODE))
    assert place(REQUEST, one_open, DISAGG).prefill_worker == "p1"


def test_policy_updates_are_validated_by_name():
    with pytest.raises(ValueError) as unknown:
        AUTO.updated({"warp_speed": 9})
    with pytest.raises(ValueError) as bad_value:
        AUTO.updated({"prefill_tokens_per_s": "fast"})
    with pytest.raises(ValueError) as bad_mode:
        AUTO.updated({"mode": "sideways"})
    assert "warp_speed" in str(unknown.value)
    assert "prefill_tokens_per_s" in str(bad_value.value)
    assert "sideways" in str(bad_mode.value)
    assert AUTO.updated({"mode": "disagg"}).to_json()["mode"] == "disagg"
