"""Starting and stopping a local `pdserve up` for `bench compare`.

Both modes get the same total number of worker processes:
- disagg with N workers: `--mode disagg --prefill P --decode N-P` (P = N // 2 unless given);
- colocated with N workers: `--mode colocated --prefill 1 --decode N-1`, which `pdserve up`
  runs as N workers of role `both` (it starts prefill + decode workers in total).

`pdserve up` runs in its own session (process group); stdout and stderr go to a log file,
polled for the one ready line. Stopping sends SIGTERM to `pdserve up` (which stops its
children), then SIGKILL to whatever is left in the group after a grace period.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.processes import free_port

MODES = ("colocated", "disagg")
READY_LINE = re.compile(r"pdserve ready: (?P<url>http://\S+/v1) ")


class StackFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class StackSpec:
    model: str
    mode: str
    workers: int  # total worker processes
    prefill_workers: int | None = None  # disagg only; default workers // 2
    threads: int | None = None  # torch threads per worker; None lets `pdserve up` decide
    prefill_layout: str = ""  # e.g. "tp=2"; each rank its own process
    decode_layout: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.workers < 2:
            raise ValueError(f"need at least 2 workers (one prefill + one decode in disagg), got {self.workers}")
        if self.mode == "disagg" and not 1 <= self.num_prefill < self.workers:
            raise ValueError(f"prefill workers must be in [1, {self.workers - 1}], got {self.num_prefill}")

    @property
    def num_prefill(self) -> int:
        return self.prefill_workers if self.prefill_workers is not None else self.workers // 2

    def layout(self) -> str:
        if self.mode == "colocated":
            return f"{self.workers} x both"
        return f"{self.num_prefill} prefill + {self.workers - self.num_prefill} decode"

    def up_flags(self) -> list[str]:
        prefill = 1 if self.mode == "colocated" else self.num_prefill
        flags = ["--model", self.model, "--mode", self.mode, "--prefill", str(prefill), "--decode", str(self.workers - prefill)]
        flags += ["--threads", str(self.threads)] if self.threads else []
        flags += ["--prefill-layout", self.prefill_layout] if self.prefill_layout else []
        return flags + (["--decode-layout", self.decode_layout] if self.decode_layout else [])


@contextmanager
def running_stack(spec: StackSpec, log_path: Path, ready_timeout_s: float = 600.0, api_key: str | None = None) -> Iterator[str]:
    """Yields the stack's base URL (…/v1); stops the whole process group on exit.

    The gateway requires `api_key` (given through the environment, so it stays out of
    `ps` and of the log); without one it is open."""
    command = [sys.executable, "-m", "services.cli", "up", "--port", str(free_port()), *spec.up_flags()]
    if api_key is None:
        command.append("--no-api-key")
    with running(command, log_path, ready_timeout_s, {"PDSERVE_API_KEY": api_key or ""}) as url:
        yield url


@contextmanager
def running(command: list[str], log_path: Path, ready_timeout_s: float, env: dict[str, str] | None = None) -> Iterator[str]:
    """Runs `command` in a new session until it logs the ready line; yields the URL from it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield _wait_ready(proc, log_path, ready_timeout_s)
    finally:
        stop_group(proc)


def _wait_ready(proc: subprocess.Popen, log_path: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = READY_LINE.search(log_path.read_text(errors="replace"))
        if match:
            return match["url"]
        if proc.poll() is not None:
            raise StackFailed(f"pdserve up exited with code {proc.returncode} before it was ready; see {log_path}")
        time.sleep(0.2)
    raise StackFailed(f"pdserve up was not ready after {timeout_s:.0f}s; see {log_path}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(proc: subprocess.Popen, grace_s: float = 30.0, orphan_grace_s: float = 3.0) -> bool:
    """SIGTERM to `pdserve up`, which stops its children; True if the whole group exited by itself.

    Whatever is left `orphan_grace_s` after the leader exited, or `grace_s` after the
    signal, is SIGKILLed."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        if proc.poll() is not None:  # reaped: the leader no longer counts as alive
            deadline = min(deadline, time.monotonic() + orphan_grace_s)
        time.sleep(0.1)
    clean = not _group_alive(pgid)
    if not clean:
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()
    return clean
