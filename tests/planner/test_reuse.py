"""The planner runs the project's own scheduling code: the very objects the services import, not copies."""

import services.scheduler.policy as scheduler_policy
import services.scheduler.service as scheduler_service
import shared.engine.engine as engine_module
from planner import sim_worker, simulator
from planner.deployment import STEP_TOKENS, Deployment, Pool
from planner.hardware import H100_HGX8
from planner.model_spec import load_model_spec
from planner.simulator import Arrival, SimConfig, Simulation
from services.scheduler.policy import Mode
from services.scheduler.registry import WorkerRegistry
from shared.engine.kv_cache import BlockAllocator
from shared.engine.scheduler import Scheduler
from shared.engine.sequence import Sequence
from shared.layouts import DecoderLayout, PrefillLayout
from shared.protocol import Role

MODEL = load_model_spec("llama-3.1-8b")
DISAGG = Deployment(Mode.DISAGG, (Pool(Role.PREFILL, PrefillLayout(), 1), Pool(Role.DECODE, DecoderLayout(), 1)))
ARRIVALS = [Arrival(0.01 * i, 300, 8) for i in range(10)]


def test_the_placement_policy_is_the_scheduler_services_own():
    assert simulator.scheduler_policy is scheduler_policy
    assert scheduler_service.place is scheduler_policy.place  # what the service calls
    assert scheduler_service.record_placement is scheduler_policy.record_placement


def test_every_placement_goes_through_the_policy_module(monkeypatch):
    calls = []
    real_place = scheduler_policy.place

    def spy(request, workers, policy):
        calls.append((request.request_id, policy.mode))
        return real_place(request, workers, policy)

    monkeypatch.setattr(scheduler_policy, "place", spy)
    Simulation(SimConfig(DISAGG, MODEL, H100_HGX8)).run(ARRIVALS)
    assert [rid for rid, _ in calls] == [f"r{i}" for i in range(10)]
    assert {mode for _, mode in calls} == {Mode.DISAGG}


def test_every_step_is_planned_by_the_engines_scheduler(monkeypatch):
    assert engine_module.Scheduler is Scheduler  # what the engine steps with
    assert sim_worker.Scheduler is Scheduler and sim_worker.BlockAllocator is BlockAllocator
    planned = []
    real_schedule = Scheduler.schedule

    def spy(self):
        plan = real_schedule(self)
        planned.append(len(plan))
        return plan

    monkeypatch.setattr(Scheduler, "schedule", spy)
    sim = Simulation(SimConfig(DISAGG, MODEL, H100_HGX8))
    sim.run(ARRIVALS)
    assert len(planned) >= 20 and sum(planned) > 0
    for worker in sim.workers.values():
        assert type(worker.scheduler) is Scheduler and type(worker.allocator) is BlockAllocator
    assert isinstance(sim.registry, WorkerRegistry)


def test_sequences_are_the_engines_and_the_step_budgets_the_workers():
    from services.worker.main import DEFAULT_STEP_TOKENS

    assert STEP_TOKENS == DEFAULT_STEP_TOKENS
    sim = Simulation(SimConfig(DISAGG, MODEL, H100_HGX8))
    worker = sim.workers["prefill-0"]
    from planner.sim_worker import SimRequest

    worker.accept_prefill(SimRequest(0, 0.0, 100, 4), hand_off=True)
    (seq,) = worker.scheduler.waiting
    assert type(seq) is Sequence and seq.hand_off and seq.num_reserved_tokens == 104
