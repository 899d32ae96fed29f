"""When `pdserve up` restarts a child that died, and when it gives up. Pure: no processes here.

A child's crashes are remembered for `window_s`. Each restart waits a backoff that doubles
with the crashes in the window (1 s, 2 s, 4 s, ... capped at `max_backoff_s`), so a child
that dies at once on start does not spin; `max_crashes` crashes within the window and it
is given up on. Crashes older than the window are forgotten: a child that ran fine for a
while starts again from the shortest backoff.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    max_crashes: int = 5
    window_s: float = 300.0
    first_backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_crashes < 1 or self.window_s <= 0 or self.first_backoff_s < 0 or self.max_backoff_s < self.first_backoff_s:
            raise ValueError(f"invalid restart policy: {self}")


@dataclass
class CrashHistory:
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    _crashes: deque[float] = field(default_factory=deque)

    def record(self, now: float) -> None:
        self._crashes.append(now)
        self._forget_before(now - self.policy.window_s)

    def recent(self, now: float) -> int:
        self._forget_before(now - self.policy.window_s)
        return len(self._crashes)

    def exhausted(self, now: float) -> bool:
        """True once `max_crashes` happened within the window: stop restarting."""
        return self.recent(now) >= self.policy.max_crashes

    def backoff_s(self, now: float) -> float:
        """How long to wait before the next restart."""
        crashes = max(1, self.recent(now))
        return min(self.policy.max_backoff_s, self.policy.first_backoff_s * 2 ** (crashes - 1))

    def _forget_before(self, cutoff: float) -> None:
        while self._crashes and self._crashes[0] < cutoff:
            self._crashes.popleft()

