"""Live workers, known only from their heartbeats; one that stops beating expires.

A worker is one incarnation of a process: a heartbeat under a known id but a new
incarnation means the old process died and was restarted, so the old one is down too.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from shared.protocol import Heartbeat

HEARTBEAT_INTERVAL_S = 1.0
LOAD_BEAT_GAP_S = 0.1  # a worker also beats this long after a request leaves it (fresh load for placement)
WORKER_TTL_S = 3.0


@dataclass
class WorkerLoad:
    """A heartbeat plus what this scheduler placed since it arrived (so bursts spread).

    The prompt tokens still to prefill are a fluid queue: the beat's, plus each placement's
    prompt when it is placed, drained at the worker's reported prefill rate. Without the drain
    every worker but the one that beat last looks as loaded as it was, and that one draws
    request after request (herding: the planner's pooled 3 prefill + 5 decode simulation lost
    ~40% of its goodput to it)."""

    beat: Heartbeat
    seen_at: float
    placed_waiting: int = 0
    placed_by_group: Counter[int] = field(default_factory=Counter)  # decodes placed per attention-DP group
    prefill_backlog: float = field(init=False)  # tokens, as of backlog_at
    backlog_at: float = field(init=False)

    def __post_init__(self) -> None:
        self.prefill_backlog = float(self.beat.queued_prefill_tokens)
        self.backlog_at = self.seen_at

    def drain_to(self, now: float) -> None:
        """Ages the backlog to `now`. Drains for one beat interval at most: a worker that stays
        silent may be stuck, and must not come to look idle."""
        until = min(now, self.seen_at + HEARTBEAT_INTERVAL_S)
        if until > self.backlog_at:
            self.prefill_backlog = max(0.0, self.prefill_backlog - self.beat.prefill_tokens_per_s * (until - self.backlog_at))
            self.backlog_at = until

    def add_prefill(self, tokens: int) -> None:
        self.prefill_backlog += tokens
        self.placed_waiting += 1

    @property
    def placed_decodes(self) -> int:
        return sum(self.placed_by_group.values())

    @property
    def worker_id(self) -> str:
        return self.beat.worker_id

    @property
    def incarnation(self) -> str:
        return self.beat.incarnation

    @property
    def queued_prefill_tokens(self) -> int:
        return round(self.prefill_backlog)

    @property
    def running(self) -> int:
        return self.beat.running + self.beat.waiting + self.placed_decodes

    @property
    def waiting(self) -> int:
        return self.beat.waiting + self.placed_waiting


@dataclass(frozen=True)
class LostWorker:
    """A worker incarnation that is gone, and why (for the worker-down event)."""

    worker_id: str
    incarnation: str
    reason: str


class WorkerRegistry:
    def __init__(self, ttl_s: float = WORKER_TTL_S, clock=time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._workers: dict[str, WorkerLoad] = {}

    def observe(self, beat: Heartbeat) -> LostWorker | None:
        """Records a heartbeat; returns the previous incarnation if this one replaces it."""
        previous = self._workers.get(beat.worker_id)
        self._workers[beat.worker_id] = WorkerLoad(beat=beat, seen_at=self._clock())
        if previous is not None and previous.incarnation != beat.incarnation:
            return LostWorker(beat.worker_id, previous.incarnation, "restarted (a new incarnation is beating)")
        return None

    def alive(self) -> list[WorkerLoad]:
        """Live workers, their prefill backlogs aged to now (for the placement at hand)."""
        now = self._clock()
        live = [load for load in self._workers.values() if now - load.seen_at <= self.ttl_s]
        for load in live:
            load.drain_to(now)
        return live

    def expire(self) -> list[LostWorker]:
        """Forgets workers silent for longer than the TTL; returns them."""
        now = self._clock()
        lost = []
        for worker_id, load in list(self._workers.items()):
            silent = now - load.seen_at
            if silent > self.ttl_s:
                del self._workers[worker_id]
                lost.append(LostWorker(worker_id, load.incarnation, f"no heartbeat for {silent:.1f}s"))
        return lost

    def forgive_silence(self) -> None:
        """After this scheduler's own NATS outage: silence was ours, give every worker a fresh TTL."""
        now = self._clock()
        for load in self._workers.values():
            load.seen_at = now

    def get(self, worker_id: str) -> WorkerLoad | None:
        return self._workers.get(worker_id)
