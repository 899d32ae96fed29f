"""Starting `pdserve up` (or single services) as real subprocesses for tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared.nats_auth import NatsAuth
from shared.nats_permissions import NatsRole
from shared.processes import alive, children_of, free_port
from shared.stack_registry import running_stacks
from shared.subjects import Subjects

READY_LINE = re.compile(r"pdserve ready: (?P<url>http://\S+/v1) .*nats (?P<nats>nats://\S+)\)")
API_KEY_LINE = re.compile(r"pdserve api key: (?P<key>\S+)")


@dataclass
class RunningStack:
    proc: subprocess.Popen
    base_url: str  # ends in /v1
    nats_url: str
    port: int
    api_key: str | None = None  # the key `pdserve up` generated, if it did

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    def admin_nats_options(self) -> dict:
        """`nats.connect` options with the admin credentials of this stack's NATS."""
        entry = next(s for s in running_stacks() if s["pid"] == self.proc.pid)
        creds = Path(entry["admin_creds"]) if entry.get("admin_creds") else None
        return NatsAuth(creds).connect_options(Subjects(entry["prefix"]), NatsRole.ADMIN)


def start_stack(*flags: str, timeout: float = 300.0, open_gateway: bool = True, env: dict | None = None) -> RunningStack:
    """`open_gateway`: serve without API keys (tests of the serving path); NATS is secured
    as `pdserve up` always does. Otherwise the flags or `env` give the key, or it is generated."""
    port = free_port()
    env = {**os.environ, "PDSERVE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--port", str(port), *flags, *(["--no-api-key"] if open_gateway else [])],
        stdout=subprocess.PIPE,
        stderr=None,  # worker logs show up in pytest's captured output on failure
        text=True,
        env=env,
    )
    deadline = time.monotonic() + timeout
    api_key = None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            raise RuntimeError(f"pdserve up exited with {proc.returncode} before it was ready")
        if key := API_KEY_LINE.search(line):
            api_key = key["key"]
        match = READY_LINE.search(line)
        if match:
            return RunningStack(proc, match["url"], match["nats"], port, api_key)
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
