"""Live workers, known only from their heartbeats; one that stops beating expires."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shared.protocol import Heartbeat

HEARTBEAT_INTERVAL_S = 1.0
WORKER_TTL_S = 3.0


@dataclass
class WorkerLoad:
    """A heartbeat plus what this scheduler placed since it arrived (so bursts spread)."""

    beat: Heartbeat
    seen_at: float
    placed_prefill_tokens: int = 0
    placed_decodes: int = 0
    placed_waiting: int = 0
    placed_by_group: dict[int, int] = field(default_factory=dict)  # decodes placed per attention-DP group

    @property
    def worker_id(self) -> str:
        return self.beat.worker_id

    @property
    def queued_prefill_tokens(self) -> int:
        return self.beat.queued_prefill_tokens + self.placed_prefill_tokens

    @property
    def running(self) -> int:
        return self.beat.running + self.beat.waiting + self.placed_decodes

    @property
    def waiting(self) -> int:
        return self.beat.waiting + self.placed_waiting


class WorkerRegistry:
    def __init__(self, ttl_s: float = WORKER_TTL_S, clock=time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._workers: dict[str, WorkerLoad] = {}

    def observe(self, beat: Heartbeat) -> None:
        self._workers[beat.worker_id] = WorkerLoad(beat=beat, seen_at=self._clock())

    def alive(self) -> list[WorkerLoad]:
        now = self._clock()
        expired = [wid for wid, load in self._workers.items() if now - load.seen_at > self.ttl_s]
        for wid in expired:
            del self._workers[wid]
        return list(self._workers.values())

    def get(self, worker_id: str) -> WorkerLoad | None:
        return self._workers.get(worker_id)
