"""Request ids cancelled on this worker, remembered for a while.

A cancel can arrive before the job it cancels (the gateway cancels on every worker of
the placement at once), so ids are kept until the job shows up or they expire.
"""

from __future__ import annotations

import time

REMEMBER_S = 300.0


class Cancellations:
    def __init__(self, remember_s: float = REMEMBER_S, clock=time.monotonic):
        self._remember_s = remember_s
        self._clock = clock
        self._ids: dict[str, float] = {}

    def add(self, request_id: str) -> None:
        self._forget_old()
        self._ids[request_id] = self._clock()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    def discard(self, request_id: str) -> None:
        self._ids.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._ids)

    def _forget_old(self) -> None:
        cutoff = self._clock() - self._remember_s
        for request_id in [rid for rid, at in self._ids.items() if at < cutoff]:
            del self._ids[request_id]
