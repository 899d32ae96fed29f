"""The simulation on cases with closed-form answers, and its own invariants."""

import dataclasses

import numpy as np
import pytest

from loadtest.workloads import LengthMix, LengthRange, RequestClass, fixed
from planner.cost_model import CostModel, decode_batch, prompt_chunk
from planner.deployment import Deployment, Pool
from planner.hardware import H100_HGX8
from planner.metrics import Slo, summarize, weighted_percentile
from planner.herding import FreshLoadSimulation
from planner.model_spec import load_model_spec
from planner.simulator import Arrival, SimConfig, Simulation, simulate
from planner.workload import RequestSource
from services.scheduler.registry import HEARTBEAT_INTERVAL_S, LOAD_BEAT_GAP_S
from services.scheduler.policy import Mode
from shared.layouts import DecoderLayout, PrefillLayout
from shared.protocol import Role

MODEL = load_model_spec("llama-3.1-8b")
HW = H100_HGX8
OVERHEAD = HW.efficiency.request_overhead_s


def colocated(count=1, step_tokens=512):
    return Deployment(Mode.COLOCATED, (Pool(Role.BOTH, DecoderLayout(tp=1), count, step_tokens),))


def disagg(prefill=1, decode=1, prefill_tokens=2048):
    return Deployment(Mode.DISAGG, (Pool(Role.PREFILL, PrefillLayout(tp=1), prefill, prefill_tokens),
                                     Pool(Role.DECODE, DecoderLayout(tp=1), decode)))


def test_one_request_waits_for_nothing_its_ttft_is_its_prefill():
    config = SimConfig(disagg(), MODEL, HW)
    result = simulate(config, [Arrival(0.25, 3000, 1)])
    (req,) = result.requests
    cost = CostModel(MODEL, HW, PrefillLayout(tp=1))
    first_chunk = dataclasses.replace(prompt_chunk(2048, 0), sampled=0)  # two chunks of the 2048 budget; the first samples nothing
    prefill = cost.step_time(first_chunk) + cost.step_time(prompt_chunk(952, 2048))
    assert req.first_token_at - req.arrival == pytest.approx(prefill, rel=1e-12)
    assert summarize(result).p50_ttft_ms == pytest.approx((prefill + OVERHEAD) * 1000, rel=1e-9)


def test_one_disaggregated_request_end_to_end_is_prefill_plus_handoff_plus_its_decode_steps():
    result = simulate(SimConfig(disagg(), MODEL, HW), [Arrival(0.0, 1000, 5)])
    (req,) = result.requests
    prefill = CostModel(MODEL, HW, PrefillLayout(tp=1))
    decode = CostModel(MODEL, HW, DecoderLayout(tp=1))
    handoff = prefill.handoff_time(1000, DecoderLayout(tp=1), devices=2)
    steps = sum(decode.step_time(decode_batch(1, 1000 + i)) for i in range(4))  # tokens 2..5
    expected = prefill.step_time(prompt_chunk(1000, 0)) + handoff + steps
    assert req.finished_at == pytest.approx(expected, rel=1e-12)
    assert req.tokens == 5 and not req.error


def test_a_queue_of_identical_prefills_waits_as_mdl_says():
    """Poisson arrivals, one worker, one prompt per step of fixed length: an M/D/1 queue.
    Mean wait = rho * S / (2 * (1 - rho))."""
    service = CostModel(MODEL, HW, DecoderLayout(tp=1)).step_time(prompt_chunk(1024, 0))
    rho = 0.5
    source = RequestSource(fixed(1024, 1), seed=3)
    arrivals = source.at_rate(rho / service, 6000)  # deterministic for the seed; 6000 samples: within ~8% (seeds 0-5)
    config = SimConfig(colocated(step_tokens=1024), MODEL, HW, max_waiting=100000)
    result = simulate(config, arrivals)
    waits = [r.first_token_at - r.arrival - service for r in result.requests]
    expected = rho * service / (2 * (1 - rho))
    assert min(waits) == pytest.approx(0.0, abs=1e-12)  # some find the worker idle
    assert np.mean(waits) == pytest.approx(expected, rel=0.08)


def _mixed_workload(n=300, rate=40.0):
    mix = LengthMix("mixed", (RequestClass("long", 1, LengthRange(500, 3000), LengthRange(20, 200)),
                              RequestClass("chat", 3, LengthRange(20, 300), LengthRange(5, 100))))
    return RequestSource(mix, seed=1).at_rate(rate, n)


@pytest.mark.parametrize("deployment", [colocated(2), disagg(1, 2)], ids=["colocated", "disagg"])
def test_the_fast_path_for_runs_of_decode_steps_changes_nothing(deployment):
    arrivals = _mixed_workload()
    fast = simulate(SimConfig(deployment, MODEL, HW), arrivals)
    slow = simulate(SimConfig(deployment, MODEL, HW, fast_decode=False), arrivals)
    for a, b in zip(fast.requests, slow.requests):
        assert (a.tokens, a.error) == (b.tokens, b.error)
        assert a.first_token_at == pytest.approx(b.first_token_at, rel=1e-9)
        assert a.finished_at == pytest.approx(b.finished_at, rel=1e-9)
    f, s = summarize(fast), summarize(slow)
    assert f.p99_itl_ms == pytest.approx(s.p99_itl_ms, rel=1e-9)
    assert f.p50_itl_ms == pytest.approx(s.p50_itl_ms, rel=1e-9)


@pytest.mark.parametrize("deployment", [colocated(2), disagg(1, 2)], ids=["colocated", "disagg"])
def test_every_request_ends_and_every_kv_page_comes_back(deployment):
    sim = Simulation(SimConfig(deployment, MODEL, HW))
    result = sim.run(_mixed_workload(rate=80.0))
    assert all(r.finished_at is not None or r.error for r in result.requests)
    for worker in sim.workers.values():
        assert worker.allocator.num_free == worker.allocator.num_blocks, worker.worker_id
        assert not worker.requests and not worker.landed and worker.waiting == 0
        assert worker.scheduler.num_waiting == 0 and not worker.scheduler.admitted


def test_a_full_queue_refuses_instead_of_growing():
    config = SimConfig(colocated(1), MODEL, HW, max_waiting=4)
    result = simulate(config, [Arrival(0.0, 2000, 4) for _ in range(20)])
    errors = [r.error for r in result.requests if r.error]
    assert errors and all("queue" in e or "waiting" in e for e in errors)
    assert summarize(result, Slo(1e6, 1e6)).attainment == pytest.approx((20 - len(errors)) / 20)


def test_closed_loop_keeps_exactly_concurrency_requests_in_flight():
    config = SimConfig(colocated(1), MODEL, HW, concurrency=3)
    result = simulate(config, [Arrival(0.0, 200, 10) for _ in range(12)])
    starts = sorted(r.arrival for r in result.requests)
    ends = sorted(r.finished_at for r in result.requests)
    assert starts[:3] == [0.0, 0.0, 0.0]
    assert starts[3:] == pytest.approx(ends[:9], rel=1e-12)  # each next request leaves as one ends


def test_steady_state_leaves_the_warmup_out():
    config = dataclasses.replace(SimConfig(colocated(1), MODEL, HW), warmup=10)
    result = simulate(config, _mixed_workload(n=40, rate=5.0))
    assert len(result.measured) == 30 and result.measured[0].index == 10
    assert summarize(result).completed == 30


def test_weighted_percentile_equals_numpy_on_the_repeated_sample():
    rng = np.random.default_rng(0)
    values, counts = rng.random(50), rng.integers(1, 6, 50)
    repeated = np.repeat(values, counts)
    for p in (0, 10, 50, 90, 99, 100):
        assert weighted_percentile(values, counts, p) == pytest.approx(float(np.percentile(repeated, p)), rel=1e-12)


def _poisson(rate: float, n: int, seed: int = 0) -> list[Arrival]:
    gaps = np.random.default_rng(seed).exponential(1 / rate, n)
    return [Arrival(float(t), 256, 256) for t in np.cumsum(gaps)]


POOL_SLO = Slo(ttft_ms=45.0, tpot_ms=30.0)  # llama-3.1-8b on one H100, 256/256: the planner's default SLOs


def _attainment(deployment: Deployment, rate: float, fresh_load: bool = False) -> float:
    """`fresh_load`: the scheduler sees every worker's true load at each placement."""
    warmup, measured = 600, 1200
    config = dataclasses.replace(SimConfig(deployment, MODEL, HW), warmup=warmup)
    sim = FreshLoadSimulation(config) if fresh_load else Simulation(config)
    return summarize(sim.run(_poisson(rate, warmup + measured)), POOL_SLO).attainment


def test_pooled_colocated_instances_lose_nothing_when_placement_sees_fresh_load():
    """Eight instances behind the placement policy, each worker's load seen as it is at each
    placement, meet the SLOs at 8x the rate one instance alone meets them at: the simulator's
    pooling itself costs nothing; what pooled colocated loses with 1 s heartbeats is staleness."""
    alone = _attainment(colocated(1), 250 / 8)
    assert alone >= 0.95
    assert _attainment(colocated(8), 250, fresh_load=True) >= alone - 0.01


def test_pooled_colocated_instances_do_as_well_as_one_alone_with_heartbeat_load():
    """Near the goodput edge (350 req/s), as pdserve places: with heartbeats alone the scheduler
    herded onto the freshest beat (86.5% against 96.3% alone); with the prefill backlog drained
    and colocated placed by backlog first it does not (docs/planner.md, 'Pooling')."""
    assert _attainment(colocated(8), 350) >= _attainment(colocated(1), 350 / 8) - 0.01


def test_a_pooled_disaggregated_deployment_places_as_well_as_with_fresh_load():
    """3 prefill + 5 decode at 300 req/s: 82% with heartbeat load before the prefill backlog was
    drained (the prefill pool herded), ~100% with fresh load."""
    assert _attainment(disagg(3, 5), 300) >= _attainment(disagg(3, 5), 300, fresh_load=True) - 0.01


@pytest.mark.parametrize("deployment", [colocated(1), disagg(1, 1)], ids=["colocated", "disagg"])
def test_workers_beat_every_interval_and_soon_after_a_request_leaves(deployment):
    sim = Simulation(SimConfig(deployment, MODEL, HW))
    beats: list[tuple[str, float]] = []
    observe = sim.registry.observe

    def _observe(beat):
        beats.append((beat.worker_id, beat.sent_at))
        observe(beat)

    sim.registry.observe = _observe
    (req,) = sim.run([Arrival(1.0, 256, 300)]).requests  # from 1 s to ~3 s: periodic beats before and after
    landed = req.first_token_at + CostModel(MODEL, HW, PrefillLayout(tp=1)).handoff_time(256, DecoderLayout(tp=1), devices=2)
    for worker in sim.workers.values():
        left = landed if worker.role is Role.PREFILL else req.finished_at  # the request leaves its table
        times = np.array([t for w, t in beats if w == worker.worker_id][1:])  # after the registration at 0
        load_beat = int(np.argmin(abs(times - (left + LOAD_BEAT_GAP_S))))
        assert times[load_beat] == pytest.approx(left + LOAD_BEAT_GAP_S, rel=1e-12), worker.worker_id
        assert load_beat >= 1 and times[load_beat - 1] < left  # the first beats: periodic, until the request leaves
        assert np.diff(times[:load_beat]) == pytest.approx(HEARTBEAT_INTERVAL_S, rel=1e-12)
        assert np.diff(times[load_beat:]) == pytest.approx(HEARTBEAT_INTERVAL_S, rel=1e-12)  # then from the load beat on
