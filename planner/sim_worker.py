"""One simulated worker instance: the engine's own step scheduler, stepped in simulated time.

The engine's `Scheduler`, `BlockAllocator` and `Sequence` (shared/engine/) decide every
step exactly as in a worker; a step's duration comes from the cost model instead of a
forward pass. What the engine does after a pass is mirrored here, as `Engine._append`
does it: the sampled token, `finish` at max_tokens (benchmarks ignore EOS), a hand-off
sequence freed at its first token, finished sequences freed after the step. What the
worker shell adds is mirrored too: its `waiting` count (accepted prefill jobs before their
first token, hand-offs before their pages), `queued_prefill_tokens`, the `max_waiting`
refusal, measured rates (`services/worker/rates.MeasuredRates`) and the heartbeat.

Life cycle of a request here: accept_prefill -> queued on the Scheduler -> chunks -> first
token (disagg: freed, KV handed off; colocated: decodes on) ... or accept_handoff ->
land_handoff (KV arrived; admitted at the next step boundary when pages are free) -> decodes.

Fast path: when a step plans only decodes, every following step plans the same sequences
(nothing can be admitted until something finishes or arrives), so the run up to the first
finish is one event. An arrival cuts it at the step boundary after it (`interrupt`).
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque

import numpy as np

from planner.cost_model import CostModel, StepShape
from services.worker.rates import MeasuredRates
from shared.engine.kv_cache import BlockAllocator
from shared.engine.sampling import RequestSampler, SamplingParams
from shared.engine.scheduler import ScheduledChunk, Scheduler, SchedulingConfig
from shared.engine.sequence import Sequence
from shared.layouts import Layout
from shared.protocol import ErrorCode, Heartbeat, Role, ServiceError


class SimRequest:
    __slots__ = ("index", "request_id", "arrival", "input_len", "output_len", "first_token_at", "finished_at",
                 "last_token_at", "tokens", "error", "decode_worker")

    def __init__(self, index: int, arrival: float, input_len: int, output_len: int):
        self.index, self.arrival, self.input_len, self.output_len = index, arrival, input_len, output_len
        self.request_id = f"r{index}"
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.last_token_at = 0.0
        self.tokens = 0
        self.error = ""
        self.decode_worker = ""

    @property
    def done(self) -> bool:
        return self.finished_at is not None or bool(self.error)


class GapLog:
    """Inter-token gaps, pooled over requests: single gaps, and runs of gaps that `count` tokens each had.

    Gaps recorded before `after` (the warm-up of a steady-state run) are left out.
    """

    def __init__(self) -> None:
        self.singles: list[float] = []
        self.runs: list[tuple[np.ndarray, int]] = []
        self.after = 0.0

    def extend(self, gaps: list[float], now: float) -> None:
        if now >= self.after:
            self.singles += gaps

    def add_run(self, gaps: np.ndarray, count: int, now: float) -> None:
        if len(gaps) and now >= self.after:
            self.runs.append((gaps, count))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(gaps, how many tokens had each)."""
        gaps = [np.asarray(self.singles, dtype=np.float64), *(g for g, _ in self.runs)]
        counts = [np.ones(len(self.singles), dtype=np.int64), *(np.full(len(g), c, dtype=np.int64) for g, c in self.runs)]
        return np.concatenate(gaps), np.concatenate(counts)


_SAMPLING: dict[int, SamplingParams] = {}


def _sampler(max_tokens: int) -> RequestSampler:
    params = _SAMPLING.get(max_tokens)
    if params is None:
        params = _SAMPLING[max_tokens] = SamplingParams(temperature=0.0, seed=0, max_tokens=max_tokens, ignore_eos=True)
    return RequestSampler(params)


class SimWorker:
    def __init__(self, worker_id: str, role: Role, layout: Layout, cost: CostModel, scheduling: SchedulingConfig,
                 kv_tokens: int, block_size: int, max_waiting: int, model_name: str, gaps: GapLog, fast: bool = True):
        self.worker_id, self.role, self.layout, self.cost = worker_id, role, layout, cost
        self.allocator = BlockAllocator(kv_tokens // block_size)
        self.scheduler = Scheduler(scheduling, self.allocator, block_size)
        self.max_waiting, self.model_name, self.gaps, self.fast = max_waiting, model_name, gaps, fast
        self.rates = MeasuredRates()
        self.requests: dict[str, SimRequest] = {}
        self.waiting = 0
        self.queued_prefill_tokens = 0
        self.landed: deque[SimRequest] = deque()  # hand-offs whose KV arrived, waiting for pages
        self.stepping = False
        self.version = 0  # bumps when a pending step end is replaced
        self._plan: list[ScheduledChunk] = []
        self._run: list[float] = []  # fast path: cumulative step ends, relative to _run_start
        self._run_start = 0.0
        # Every step decodes every decoding sequence once, so the step count at which each
        # finishes is fixed when it starts decoding: a heap of those gives the next finish.
        self._steps = 0
        self._finishes: list[int] = []
        self.link_free_at = 0.0  # this instance's NIC, one KV transfer at a time

    # -- the worker shell ----------------------------------------------------------------------

    def refusal(self, num_tokens: int) -> ServiceError | None:
        if not self.scheduler.fits_budget(num_tokens):
            return ServiceError(ErrorCode.BAD_REQUEST, f"request needs {num_tokens} KV tokens; {self.worker_id} holds fewer")
        if self.waiting >= self.max_waiting:
            return ServiceError(ErrorCode.TOO_MANY_REQUESTS, f"worker {self.worker_id} has {self.waiting} requests waiting")
        return None

    def accept_prefill(self, req: SimRequest, hand_off: bool) -> ServiceError | None:
        refused = self.refusal(req.input_len + req.output_len)
        if refused is not None:
            return refused
        self.scheduler.add(Sequence(req.request_id, [], req.input_len, _sampler(req.output_len), hand_off=hand_off))
        self.requests[req.request_id] = req
        self.waiting += 1
        self.queued_prefill_tokens += req.input_len
        return None

    def accept_handoff(self, req: SimRequest) -> ServiceError | None:
        refused = self.refusal(req.input_len + req.output_len)
        if refused is None:
            self.waiting += 1
        return refused

    def land_handoff(self, req: SimRequest) -> None:
        self.landed.append(req)

    def heartbeat(self, now: float) -> Heartbeat:
        return Heartbeat(
            worker_id=self.worker_id, role=self.role, model=self.model_name, model_fingerprint="", ucx_host="sim",
            ucx_port=0, running=self.scheduler.num_running, waiting=self.waiting, free_kv_blocks=self.allocator.num_free,
            total_kv_blocks=self.allocator.num_blocks, queued_prefill_tokens=self.queued_prefill_tokens, sent_at=now,
            prefill_tokens_per_s=self.rates.prefill_tokens_per_s, handoff_bytes_per_s=self.rates.handoff_bytes_per_s,
            layout=self.layout.describe(),
        )

    # -- stepping --------------------------------------------------------------------------------

    def _admit_landed(self) -> None:
        """Hand-offs join between steps, in arrival order, as their pages come free (add_prefilled_with)."""
        while self.landed:
            req = self.landed[0]
            if not self.scheduler.can_admit(req.input_len + req.output_len):
                return
            self.landed.popleft()
            seq = Sequence(req.request_id, [], req.input_len, _sampler(req.output_len))
            self.scheduler.admit_now(seq)
            seq.num_cached = req.input_len
            self.requests[req.request_id] = req
            self.waiting -= 1
            heapq.heappush(self._finishes, self._steps + req.output_len - req.tokens)

    def start_step(self, now: float) -> float | None:
        """Plans the next step; its end time, or None when there is nothing to run (the loop sleeps)."""
        self._admit_landed()
        plan = self.scheduler.schedule()
        self._plan = plan
        self._run = []
        if not plan:
            self.stepping = False
            return None
        self.stepping = True
        shape = _shape(plan)
        steps = self._decode_run_length(plan) if self.fast and not shape.prefill_tokens else 1
        if steps > 1:
            self._run = np.cumsum(self.cost.decode_run(shape, steps)).tolist()
            self._run_start = now
            return now + self._run[-1]
        duration = self.cost.step_time(shape)
        if shape.prefill_tokens:
            self.rates.observe_prefill(shape.prefill_tokens, duration)
        return now + duration

    def _decode_run_length(self, plan: list[ScheduledChunk]) -> int:
        """Steps until the first of the decoding sequences finishes."""
        return self._finishes[0] - self._steps

    def _advance(self, steps: int) -> None:
        self._steps += steps
        while self._finishes and self._finishes[0] <= self._steps:
            heapq.heappop(self._finishes)

    def interrupt(self, now: float) -> float | None:
        """New work arrived: a fast-path run ends at the step boundary after `now`; the new end, if it moved."""
        if len(self._run) < 2:
            return None
        done = bisect.bisect_left(self._run, now - self._run_start) + 1
        if done >= len(self._run):
            return None
        del self._run[done:]
        self.version += 1
        return self._run_start + self._run[-1]

    def finish_step(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """Applies the step's results; (hand-offs to start, requests finished here)."""
        if self._run:
            return [], self._finish_run(now)
        handoffs: list[SimRequest] = []
        finished: list[SimRequest] = []
        requests, gaps = self.requests, []
        self._advance(1)
        for chunk in self._plan:
            seq = chunk.seq
            if seq.num_cached >= seq.num_prompt_tokens:  # a decode (the common case, kept short)
                seq.num_cached += 1
                req = requests[seq.request_id]
                gaps.append(now - req.last_token_at)
                req.tokens += 1
                req.last_token_at = now
                if req.tokens >= req.output_len:
                    self._finish(seq, req, now, finished)
                continue
            samples = chunk.completes_prompt  # before num_cached moves, as Engine.step does
            seq.num_cached += chunk.num_new
            if samples:
                self._first_token(seq, now, handoffs, finished)
        self.gaps.extend(gaps, now)
        self._plan = []
        return handoffs, finished

    def _finish(self, seq: Sequence, req: SimRequest, now: float, finished: list[SimRequest]) -> None:
        self.scheduler.finish(seq, "length")
        self.scheduler.free(seq.request_id)
        del self.requests[seq.request_id]
        req.finished_at = now
        finished.append(req)

    def _first_token(self, seq: Sequence, now: float, handoffs: list, finished: list) -> None:
        req = self.requests[seq.request_id]
        req.first_token_at = req.last_token_at = now
        req.tokens = 1
        self.waiting -= 1
        self.queued_prefill_tokens -= req.input_len
        if req.tokens >= req.output_len:
            self._finish(seq, req, now, finished)
        elif seq.hand_off:  # the engine exports its KV and frees it here; the decoder continues
            self.scheduler.free(seq.request_id)
            del self.requests[seq.request_id]
            handoffs.append(req)
        else:
            heapq.heappush(self._finishes, self._steps + req.output_len - req.tokens)

    def _finish_run(self, now: float) -> list[SimRequest]:
        steps, first_end = len(self._run), self._run_start + self._run[0]
        self._advance(steps)
        self.gaps.add_run(np.diff(self._run), len(self._plan), now)
        finished: list[SimRequest] = []
        gaps = []
        for chunk in self._plan:
            seq = chunk.seq
            req = self.requests[seq.request_id]
            gaps.append(first_end - req.last_token_at)
            seq.num_cached += steps
            req.tokens += steps
            req.last_token_at = now
            if req.tokens >= req.output_len:
                self._finish(seq, req, now, finished)
        self.gaps.extend(gaps, now)
        self._plan, self._run = [], []
        return finished


def _shape(plan: list[ScheduledChunk]) -> StepShape:
    decode_seqs = decode_context = prefill_tokens = prefill_context = largest = sampled = 0
    pairs = 0.0
    for chunk in plan:
        seq, n = chunk.seq, chunk.num_new
        cached = seq.num_cached
        if cached >= seq.num_prompt_tokens:
            decode_seqs += 1
            decode_context += cached
            continue
        prefill_tokens += n
        pairs += n * (cached + (n + 1) / 2)
        prefill_context += cached + n
        largest = max(largest, n)
        sampled += cached + n >= seq.num_prompt_tokens
    return StepShape(decode_seqs, decode_context, prefill_tokens, pairs, prefill_context, largest, decode_seqs + sampled)
