"""`pdserve up`'s children: started, watched, restarted with backoff, stopped in order.

Each child is named for the user ("worker decode-1", "gateway", "scheduler",
"nats-server") and every message says which, with the last lines of its log when it
dies (the launcher's ServiceLogs keep them: services/startup_progress.py).

While serving (restarts.py decides when):
- a worker that dies is restarted after a backoff; after repeated crashes it is left
  stopped, named with its last log lines, and the rest of the stack keeps serving;
- a worker that exits 0 was drained on purpose (`pdserve admin drain`): not restarted;
- nats-server, the scheduler and the gateway are restarted the same way (each is needed
  for any request to be served, and each comes back cleanly: services reconnect to NATS,
  workers re-announce themselves); one that keeps crashing stops the whole stack with a
  message naming it, since nothing can be served without it.
During start-up any child that dies stops the stack (almost always a bad flag or model).

Stopping, in order: the gateway (it stops accepting and lets streams finish within
--drain-timeout, then ends the rest with an error event), then the workers (nothing is
left on them), then the scheduler, then nats-server. A second interrupt kills every
child at once.
"""

from __future__ import annotations

import enum
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.restarts import CrashHistory, RestartPolicy
from shared.processes import describe_exit

POLL_S = 0.05
STOP_GRACE_S = 10.0  # beyond the drain timeout: a service's own stop steps (each bounded)


class StackError(RuntimeError):
    pass


class Stage(enum.IntEnum):
    """Stop order."""

    GATEWAY = 0
    WORKERS = 1
    SCHEDULER = 2
    NATS = 3


@dataclass
class Child:
    name: str
    stage: Stage
    launch: Callable[[], subprocess.Popen]
    last_lines: Callable[[], str] = lambda: "    (no log kept)"  # its log's tail, indented, for messages
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    proc: subprocess.Popen | None = None
    restart_at: float | None = None
    retired: bool = False  # given up on, or drained on purpose: not restarted

    def __post_init__(self) -> None:
        self.history = CrashHistory(self.policy)

    @property
    def essential(self) -> bool:
        return self.stage is not Stage.WORKERS

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.proc = self.launch()
        self.restart_at = None


def report(message: str) -> None:
    print(f"pdserve up: {message}", file=sys.stderr, flush=True)


class Supervisor:
    def __init__(self, clock: Callable[[], float] = time.monotonic, say: Callable[[str], None] = report):
        self.children: list[Child] = []
        self._clock = clock
        self._say = say

    def add(self, child: Child) -> Child:
        """Starts `child` and watches it from now on."""
        child.start()
        self.children.append(child)
        return child

    def poll(self) -> None:
        """Restarts children whose backoff is over and handles those that just exited."""
        now = self._clock()
        for child in self.children:
            if child.retired:
                continue
            if child.proc is None:
                if child.restart_at is not None and now >= child.restart_at:
                    child.start()
                    self._say(f"{child.name} restarted (pid {child.proc.pid})")
                continue
            code = child.proc.poll()
            if code is not None:
                self._exited(child, code, now)

    def _exited(self, child: Child, code: int, now: float) -> None:
        child.proc = None
        how = describe_exit(code)
        if not child.essential and code == 0:
            child.retired = True
            self._say(f"{child.name} exited after a drain; not restarting it")
            return
        child.history.record(now)
        if child.history.exhausted(now):
            child.retired = True
            policy = child.policy
            message = (
                f"{child.name} crashed {policy.max_crashes} times within {policy.window_s:.0f}s (last: {how}); not restarting it. "
                f"Its last log lines:\n{child.last_lines()}"
            )
            if child.essential:
                raise StackError(f"{message}\nthe stack cannot serve without the {child.name}; stopping it")
            self._say(f"{message}\nthe rest of the stack keeps serving")
            return
        backoff = child.history.backoff_s(now)
        child.restart_at = now + backoff
        self._say(f"{child.name} {how}; restarting it in {backoff:.0f}s")

    def stop(self, drain_timeout_s: float, forced: Callable[[], bool]) -> None:
        """Stops every child in Stage order; `forced()` turning true kills all at once."""
        for stage in Stage:
            procs = [c.proc for c in self.children if c.stage is stage and c.running]
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            budget = drain_timeout_s + STOP_GRACE_S if stage in (Stage.GATEWAY, Stage.WORKERS) else STOP_GRACE_S
            deadline = self._clock() + budget
            while any(p.poll() is None for p in procs) and self._clock() < deadline and not forced():
                time.sleep(POLL_S)
            if forced():
                self._say("second interrupt: killing every process now")
                self.kill_all()
                return
            for proc in procs:
                if proc.poll() is None:
                    self._say(f"{self._name_of(proc)} did not stop within {budget:.0f}s; killing it")
                    proc.kill()
                    proc.wait()

    def kill_all(self) -> None:
        for child in self.children:
            if child.running:
                child.proc.kill()
        for child in self.children:
            if child.proc is not None:
                child.proc.wait()

    def _name_of(self, proc: subprocess.Popen) -> str:
        return next((c.name for c in self.children if c.proc is proc), f"pid {proc.pid}")
