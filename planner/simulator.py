"""The discrete-event simulation: arrivals, heartbeats, placement, engine steps, KV hand-offs.

Events, in time order (ties in the order they were made):
- ARRIVAL: the scheduler service's own code places the request — `policy.place()` over
  `WorkerRegistry.alive()`, then `record_placement()` — exactly as its `_on_place` does;
  the chosen worker accepts the prefill job or refuses it (queue full: 429).
- STEP_END: a worker's engine step (or fast-path run of decode steps) ends: tokens are
  emitted, sequences finish or hand off; the worker starts its next step at once while
  it has work (`EngineLoop`), else sleeps until work arrives.
- HANDOFF: a prompt's KV has crossed the link to its decode worker, which admits it at its
  next step boundary once the pages are free. A transfer waits for the sending and the
  receiving instance's NIC (one transfer at a time on each).
- HEARTBEAT: each worker reports its load as the worker's `_beat_forever` does: every
  `HEARTBEAT_INTERVAL_S` (first beats staggered), and `LOAD_BEAT_GAP_S` after a request
  leaves it (finished; a prefill worker's hand-off landed or failed); ends within the gap
  share that beat, and the interval restarts from it. Placement sees the same staleness it
  sees in a deployment.
The serving path outside the engine (HTTP, NATS hops, token stream) adds a constant
`request_overhead_s` to TTFT and end-to-end latency; it does not delay the engine.
No I/O: the simulation is a pure function of its inputs.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from planner.cost_model import CostModel
from planner.deployment import BLOCK_SIZE, MAX_NUM_SEQS, MAX_WAITING, Deployment, kv_tokens
from planner.hardware import Hardware
from planner.model_spec import ModelSpec
from planner.sim_worker import GapLog, SimRequest, SimWorker
from services.scheduler import policy as scheduler_policy
from services.scheduler.registry import HEARTBEAT_INTERVAL_S, LOAD_BEAT_GAP_S, WorkerRegistry
from shared.engine.scheduler import SchedulingConfig
from shared.protocol import Path, PlaceRequest, ServiceError

ARRIVAL, STEP_END, HANDOFF, HEARTBEAT = range(4)


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start (closed loop: ignored)
    input_len: int
    output_len: int


@dataclass(frozen=True)
class SimConfig:
    deployment: Deployment
    model: ModelSpec
    hardware: Hardware
    max_num_seqs: int = MAX_NUM_SEQS  # per DP group
    max_waiting: int = MAX_WAITING
    concurrency: int | None = None  # closed loop: this many in flight, the next sent when one ends
    fast_decode: bool = True
    block_size: int = BLOCK_SIZE  # KV page size (deployment.sim_block_size)
    warmup: int = 0  # the first requests fill the system; statistics leave them (and gaps before the next) out

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_waiting < 1:
            raise ValueError("max_num_seqs and max_waiting must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


@dataclass
class SimResult:
    requests: list[SimRequest]
    gaps: GapLog
    devices: int
    request_overhead_s: float
    warmup: int = 0

    @property
    def measured(self) -> list[SimRequest]:
        return self.requests[self.warmup:]


class Simulation:
    def __init__(self, config: SimConfig):
        self.config = config
        self.now = 0.0
        self._events: list = []
        self._order = itertools.count()
        self.gaps = GapLog()
        self.registry = WorkerRegistry(clock=lambda: self.now)
        self.workers = self._build_workers()
        self.policy = scheduler_policy.Policy(mode=config.deployment.mode, max_waiting_per_worker=config.max_waiting)
        self._open = 0  # requests not yet done
        self._beat_version = dict.fromkeys(self.workers, 0)  # a worker's pending beat; older ones are void
        self._beat_soon: set[str] = set()  # workers a request left, beating LOAD_BEAT_GAP_S after

    def _build_workers(self) -> dict[str, SimWorker]:
        cfg = self.config
        workers = {}
        for pool in cfg.deployment.pools:
            cost = CostModel(cfg.model, cfg.hardware, pool.layout)
            scheduling = SchedulingConfig(
                max_num_batched_tokens=pool.step_tokens,
                max_num_seqs=cfg.max_num_seqs * pool.layout.dp,
                max_waiting=cfg.max_waiting,
            )
            tokens = kv_tokens(cfg.model, cfg.hardware, pool.layout)
            for i in range(pool.count):
                worker_id = f"{pool.role.label}-{i}"
                workers[worker_id] = SimWorker(worker_id, pool.role, pool.layout, cost, scheduling, tokens, cfg.block_size,
                                               cfg.max_waiting, cfg.model.name, self.gaps, cfg.fast_decode)
        return workers

    # -- event plumbing ----------------------------------------------------------------------------

    def _push(self, at: float, kind: int, payload: object, version: int = 0) -> None:
        heapq.heappush(self._events, (at, next(self._order), kind, payload, version))

    def run(self, arrivals: Sequence[Arrival]) -> SimResult:
        requests = [SimRequest(i, a.at, a.input_len, a.output_len) for i, a in enumerate(arrivals)]
        self._open = len(requests)
        for offset, worker in enumerate(self.workers.values()):
            self.registry.observe(worker.heartbeat(0.0))
            stagger = HEARTBEAT_INTERVAL_S * (offset + 1) / (len(self.workers) + 1)
            self._push(stagger, HEARTBEAT, worker, 0)
        if self.config.concurrency is None and len(requests) > self.config.warmup:
            self.gaps.after = requests[self.config.warmup].arrival
        self._pending: Iterator[SimRequest] = iter(requests)
        first = self.config.concurrency if self.config.concurrency is not None else len(requests)
        for req in itertools.islice(self._pending, first):
            self._push(req.arrival if self.config.concurrency is None else 0.0, ARRIVAL, req)
        handlers = {ARRIVAL: self._arrive, STEP_END: self._step_end, HANDOFF: self._handoff_landed, HEARTBEAT: self._heartbeat}
        while self._events:
            at, _, kind, payload, version = heapq.heappop(self._events)
            self.now = at
            handlers[kind](payload, version)
        cfg = self.config
        return SimResult(requests, self.gaps, cfg.deployment.devices, cfg.hardware.efficiency.request_overhead_s, cfg.warmup)

    def _done(self, req: SimRequest) -> None:
        self._open -= 1
        if self.config.concurrency is not None:
            nxt = next(self._pending, None)
            if nxt is not None:
                nxt.arrival = self.now
                if nxt.index == self.config.warmup:
                    self.gaps.after = self.now
                self._push(self.now, ARRIVAL, nxt)

    def _fail(self, req: SimRequest, error: ServiceError | str) -> None:
        req.error = error.message if isinstance(error, ServiceError) else error
        self._done(req)

    # -- handlers --------------------------------------------------------------------------------

    def _heartbeat(self, worker: SimWorker, version: int) -> None:
        if version != self._beat_version[worker.worker_id]:
            return  # replaced by a beat soon after a request left
        self._beat_soon.discard(worker.worker_id)
        self.registry.observe(worker.heartbeat(self.now))
        if self._open:
            self._push(self.now + HEARTBEAT_INTERVAL_S, HEARTBEAT, worker, version)

    def _left(self, worker: SimWorker) -> None:
        """A request left `worker`'s table: it beats LOAD_BEAT_GAP_S from now (unless a beat is already that near)."""
        if worker.worker_id in self._beat_soon:
            return
        self._beat_soon.add(worker.worker_id)
        self._beat_version[worker.worker_id] += 1
        self._push(self.now + LOAD_BEAT_GAP_S, HEARTBEAT, worker, self._beat_version[worker.worker_id])

    def _arrive(self, req: SimRequest, _: int) -> None:
        request = PlaceRequest(req.request_id, self.config.model.name, req.input_len, req.output_len)
        alive = self.registry.alive()
        placement = scheduler_policy.place(request, alive, self.policy)
        if isinstance(placement, ServiceError):
            self._fail(req, placement)
            return
        scheduler_policy.record_placement(placement, request, {w.worker_id: w for w in alive})
        hand_off = placement.path is Path.DISAGG
        req.decode_worker = placement.decode_worker
        worker = self.workers[placement.prefill_worker]
        refused = worker.accept_prefill(req, hand_off)
        if refused is not None:
            self._fail(req, refused)
            return
        self._wake(worker)

    def _wake(self, worker: SimWorker) -> None:
        """New work on `worker`: start a step if it sleeps, or cut a fast-path run short."""
        if not worker.stepping:
            self._start(worker)
            return
        end = worker.interrupt(self.now)
        if end is not None:
            self._push(end, STEP_END, worker, worker.version)

    def _start(self, worker: SimWorker) -> None:
        end = worker.start_step(self.now)
        if end is not None:
            self._push(end, STEP_END, worker, worker.version)

    def _step_end(self, worker: SimWorker, version: int) -> None:
        if version != worker.version:
            return  # replaced by an earlier end (interrupt)
        handoffs, finished = worker.finish_step(self.now)
        for req in finished:
            self._done(req)
        if finished:
            self._left(worker)
        for req in handoffs:
            self._start_handoff(worker, req)
        self._start(worker)

    def _start_handoff(self, source: SimWorker, req: SimRequest) -> None:
        decode = self.workers[req.decode_worker]
        refused = decode.accept_handoff(req)
        if refused is not None:
            self._fail(req, f"KV hand-off failed: {refused.message}")
            self._left(source)
            return
        hw = self.config.hardware
        cost = source.cost
        transfer = cost.handoff_time(req.input_len, decode.layout, self.config.deployment.devices)
        overhead = min(hw.efficiency.handoff_overhead_s, transfer)
        start = max(self.now + overhead, source.link_free_at, decode.link_free_at)
        landed = start + transfer - overhead
        source.link_free_at = decode.link_free_at = landed
        nbytes = req.input_len * cost.model.kv_bytes_per_token(hw.kv_bytes)
        source.rates.observe_handoff(nbytes, landed - self.now)
        self._push(landed, HANDOFF, (source, req))

    def _handoff_landed(self, landing: tuple[SimWorker, SimRequest], _: int) -> None:
        source, req = landing
        decode = self.workers[req.decode_worker]
        decode.land_handoff(req)
        self._wake(decode)
        self._left(source)  # the prefill worker releases the request once its KV is across


def simulate(config: SimConfig, arrivals: Sequence[Arrival]) -> SimResult:
    return Simulation(config).run(arrivals)
