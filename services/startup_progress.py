"""`pdserve up` start-up: each child's log, each worker's loading progress, what we wait for.

Every child logs JSON lines into a pipe; a reader thread per child writes them to
`<run dir>/<service>.log`, keeps the last lines (shown if the child dies), reads the
`load_progress` and `*_started` events, and forwards lines to our stderr: always when
stderr is not a terminal (as JSON, for log collectors); on a terminal only once the stack
is ready (rendered for people), while a progress view is drawn in their place.

Ready means: every worker has sent a heartbeat and the gateway's /health answers 200.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import aiohttp
import structlog

from shared import processes, protocol
from shared.protocol import Heartbeat
from shared.runtime import connect_nats
from shared.subjects import Subjects

TAIL_LINES = 20
_BAR = 20
_plain = structlog.dev.ConsoleRenderer(colors=False)


class StartupError(RuntimeError):
    pass


def readable(line: str, colors: bool = False) -> str:
    """A JSON log line as a person reads it (other lines unchanged)."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return line
    if not isinstance(event, dict) or "event" not in event:
        return line
    renderer = structlog.dev.ConsoleRenderer(colors=colors) if colors else _plain
    return renderer(None, "", dict(event))


@dataclass
class Progress:
    stage: str = "starting"
    done: int = 0
    total: int = 0
    started: bool = False  # logged its *_started event

    def text(self) -> str:
        if self.total <= 0:
            return self.stage
        fraction = min(1.0, self.done / self.total)
        bar = "#" * round(fraction * _BAR)
        return f"{self.stage} [{bar:<{_BAR}}] {fraction:4.0%} ({self.done}/{self.total})"


class ServiceLog:
    """One child: its process, its log file, its last lines and its progress."""

    def __init__(self, name: str, proc: subprocess.Popen, path: Path, forward: Callable[[str], None]):
        self.name = name
        self.proc = proc
        self.path = path
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.progress = Progress()
        self._forward = forward
        self._thread = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            for line in self.proc.stdout:
                file.write(line)
                file.flush()
                line = line.rstrip("\n")
                self.tail.append(line)
                self._observe(line)
                self._forward(line)

    def _observe(self, line: str) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        name = str(event.get("event", ""))
        if name == "load_progress":
            self.progress.stage = str(event.get("stage", ""))
            self.progress.done, self.progress.total = int(event.get("done", 0)), int(event.get("total", 0))
        elif name.endswith("_started"):
            self.progress = Progress(stage="started", started=True)

    def last_lines(self) -> str:
        """Its log's tail, indented, for messages."""
        return "\n".join(f"    {readable(line)}" for line in self.tail) or "    (nothing logged)"

    def failure(self) -> str:
        return f"{self.name} exited with code {self.proc.returncode}; the last lines of {self.path}:\n{self.last_lines()}"


class ServiceLogs:
    """Spawns children whose output goes through `ServiceLog`s; `serving()` un-mutes them on a terminal."""

    def __init__(self, run_dir: Path, stream: TextIO | None = None):
        self.run_dir = run_dir
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.quiet = self.terminal  # a terminal shows the progress view until ready
        self.services: list[ServiceLog] = []
        self._lock = threading.Lock()

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        env = {**(env if env is not None else os.environ), "PDSERVE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        proc = processes.spawn(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.services.append(ServiceLog(name, proc, self.run_dir / f"{name}.log", self._forward))
        return proc

    def _forward(self, line: str) -> None:
        if self.quiet:
            return
        with self._lock:
            self.stream.write((readable(line, colors=True) if self.terminal else line) + "\n")
            self.stream.flush()

    def serving(self) -> None:
        self.quiet = False

    def dead(self) -> ServiceLog | None:
        return next((s for s in self.services if s.proc.poll() is not None), None)


class StartupView:
    """A line per service: redrawn in place on a terminal, printed when it changes otherwise."""

    def __init__(self, logs: ServiceLogs):
        self.logs = logs
        self._drawn = 0
        self._printed: dict[str, tuple] = {}
        self._started = time.monotonic()

    def draw(self, status: dict[str, str | Progress], waiting: list[str]) -> None:
        rows = [(name, state.text() if isinstance(state, Progress) else state) for name, state in status.items()]
        stream = self.logs.stream
        if self.logs.terminal:
            header = f"pdserve up: waiting for {', '.join(waiting) or 'nothing'} ({time.monotonic() - self._started:.0f}s)"
            lines = [header] + [f"  {name:<14} {text}" for name, text in rows]
            stream.write(f"\x1b[{self._drawn}F" if self._drawn else "")
            stream.write("".join(f"\x1b[2K{line}\n" for line in lines))
            stream.flush()
            self._drawn = len(lines)
            return
        for name, text in rows:
            key = _coarse(status[name])
            if self._printed.get(name) != key:
                self._printed[name] = key
                stream.write(f"pdserve up: {name}: {text}\n")
                stream.flush()


def _coarse(state: str | Progress) -> tuple:
    """What must change for a plain log to print a service's line again: its stage or a 10% step."""
    if isinstance(state, str) or state.total <= 0:
        return (state if isinstance(state, str) else state.stage,)
    return (state.stage, state.done * 10 // state.total)


@dataclass
class ReadyCheck:
    nats_url: str
    subjects: Subjects
    worker_ids: set[str]
    gateway_name: str
    health_url: str
    timeout_s: float
    interrupted: Callable[[], bool]
    nats_options: dict = field(default_factory=dict)  # credentials/TLS of the launcher's NATS client


async def wait_until_ready(check: ReadyCheck, logs: ServiceLogs) -> None:
    """Returns once every worker has beaten and /health is 200; StartupError naming the culprit otherwise."""
    view = StartupView(logs)
    nc = await connect_nats(check.nats_url, "pd-launcher", options=check.nats_options)
    seen: set[str] = set()
    decoder = protocol.decoder(Heartbeat)

    async def on_beat(msg) -> None:
        seen.add(decoder.decode(msg.data).worker_id)

    await nc.subscribe(check.subjects.all_heartbeats, cb=on_beat)
    deadline = time.monotonic() + check.timeout_s
    health = "waiting for the workers"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                if check.worker_ids <= seen:
                    health = await _health(http, check.health_url)
                status = _status(logs, check, seen, health)
                waiting = [name for name, state in status.items() if state != "ready"]
                view.draw(status, waiting)
                if not waiting:
                    return
                if (dead := logs.dead()) is not None:
                    raise StartupError(dead.failure())
                if check.interrupted():
                    raise StartupError("interrupted before the stack was ready")
                if time.monotonic() > deadline:
                    raise StartupError(f"not ready after {check.timeout_s:.0f}s; waiting for {', '.join(waiting)}")
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


def _status(logs: ServiceLogs, check: ReadyCheck, seen: set[str], health: str) -> dict[str, str | Progress]:
    """Each service's line: "ready", or where it is (loading progress, what /health misses)."""
    status = {}
    for service in logs.services:
        if service.name in check.worker_ids:
            ready = service.name in seen  # a heartbeat: loaded, connected, serving
        elif service.name == check.gateway_name:
            ready = health == "ready"
            if not ready and service.progress.started:
                status[service.name] = f"/health: {health}"
                continue
        else:
            ready = service.progress.started
        status[service.name] = "ready" if ready else replace(service.progress)  # a snapshot: the reader thread moves on
    return status


async def _health(http: aiohttp.ClientSession, url: str) -> str:
    """"ready", or what the gateway says is missing."""
    try:
        async with http.get(url) as response:
            body = await response.json(content_type=None)
            if response.status == 200:
                return "ready"
            return str(body.get("detail") or body.get("missing") or response.status)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, AttributeError):
        return "not listening yet"
