"""Starting `pdserve up` (or single services) as real subprocesses for tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from shared.processes import alive, children_of, free_port

READY_LINE = re.compile(r"pdserve ready: (?P<url>http://\S+/v1) .*nats (?P<nats>nats://\S+)\)")


@dataclass
class RunningStack:
    proc: subprocess.Popen
    base_url: str  # ends in /v1
    nats_url: str
    port: int

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")


def start_stack(*flags: str, timeout: float = 300.0) -> RunningStack:
    port = free_port()
    env = {**os.environ, "PDSERVE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=None,  # worker logs show up in pytest's captured output on failure
        text=True,
        env=env,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            raise RuntimeError(f"pdserve up exited with {proc.returncode} before it was ready")
        match = READY_LINE.search(line)
        if match:
            return RunningStack(proc, match["url"], match["nats"], port)
    stop_stack_group(proc)
    raise TimeoutError("pdserve up did not become ready")


def stop_stack_group(proc: subprocess.Popen, timeout: float = 30.0) -> bool:
    """SIGTERMs `pdserve up`; True if it and every child it started exited by themselves."""
    children = children_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftovers = [pid for pid in children if alive(pid)]
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    return not leftovers and len(children) > 0
