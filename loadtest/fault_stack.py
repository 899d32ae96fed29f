"""A local `pdserve up` to hurt on purpose: for tests/faults/ and `python -m loadtest.faults_bench`.

Workers are found by their command line (`--worker-id X --nats URL`), so a caller kills
exactly the process it means; their state comes from `admin status` over NATS. The
streaming client reads a completion to its end and keeps what a user would see: token
ids, error events, whether `[DONE]` came.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nats

from services.admin.client import AdminCallError, call
from shared.nats_auth import NatsAuth
from shared.nats_permissions import NatsRole
from shared.processes import children_of, free_port
from shared.stack_registry import running_stacks
from shared.subjects import Subjects

MODEL = "tiny-llama"
SUBJECTS = Subjects("pd")


def greedy_body(prompt: list[int], max_tokens: int, stream: bool = True) -> dict:
    return {
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, "stream": stream,
    }  # fmt: skip


@dataclass
class StreamResult:
    status: int
    token_ids: list[int] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]`
    seconds: float = 0.0
    retry_after: str | None = None
    usage: dict | None = None


async def stream(base_url: str, body: dict, on_tokens=None) -> StreamResult:
    """Posts a completion and reads it to the end; `on_tokens(result)` runs after each chunk."""
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
        async with session.post(f"{base_url}/completions", json=body) as response:
            result = StreamResult(response.status, retry_after=response.headers.get("Retry-After"))
            if response.status != 200 or not body.get("stream"):
                payload = await response.json()
                if response.status == 200:
                    choice = payload["choices"][0]
                    result.token_ids, result.finish_reason = choice["token_ids"], choice["finish_reason"]
                    result.usage = payload["usage"]
                else:
                    result.errors.append(payload["error"])
                result.seconds = time.monotonic() - started
                return result
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    result.done = True
                    break
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    result.errors.append(chunk["error"])
                    continue
                result.usage = chunk.get("usage") or result.usage
                for choice in chunk["choices"]:
                    result.token_ids += choice.get("token_ids", [])
                    result.finish_reason = choice["finish_reason"] or result.finish_reason
                if on_tokens is not None:
                    await on_tokens(result)
    result.seconds = time.monotonic() - started
    return result


@dataclass
class RunningStack:
    proc: subprocess.Popen
    base_url: str  # ends in /v1
    nats_url: str

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")


READY_LINE = re.compile(r"pdserve ready: (?P<url>http://\S+/v1) .*nats (?P<nats>nats://\S+)\)")


def start_stack(*flags: str, timeout: float = 300.0) -> RunningStack:
    """`pdserve up FLAGS --no-api-key` on a free port; returns once it printed its ready line."""
    env = {**os.environ, "PDSERVE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "services.cli", "up", "--port", str(free_port()), *flags, "--no-api-key"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            raise RuntimeError(f"pdserve up exited with {proc.returncode} before it was ready")
        if match := READY_LINE.search(line):
            return RunningStack(proc, match["url"], match["nats"])
    proc.kill()
    raise TimeoutError("pdserve up did not become ready")


def admin_nats_options(launcher_pid: int) -> dict:
    """`nats.connect` options with the admin credentials of the local `pdserve up` with that pid."""
    entry = next(s for s in running_stacks() if s["pid"] == launcher_pid)
    creds = Path(entry["admin_creds"]) if entry.get("admin_creds") else None
    return NatsAuth(creds).connect_options(Subjects(entry["prefix"]), NatsRole.ADMIN)


class FaultStack:
    """A running `pdserve up` plus the handles a fault needs."""

    def __init__(self, running: RunningStack, worker_ids: list[str]):
        self.running = running
        self.worker_ids = worker_ids
        self.nats_options = admin_nats_options(running.proc.pid)
        self._connections: dict[asyncio.AbstractEventLoop, nats.aio.client.Client] = {}

    @property
    def base_url(self) -> str:
        return self.running.base_url

    async def _nc(self):
        """One admin connection per event loop (each test runs in its own)."""
        loop = asyncio.get_running_loop()
        if loop not in self._connections:
            self._connections[loop] = await nats.connect(
                self.running.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, **self.nats_options
            )
        return self._connections[loop]

    async def close(self) -> None:
        nc = self._connections.pop(asyncio.get_running_loop(), None)
        if nc is not None:
            await nc.close()

    def nats_server_pid(self) -> int:
        port = self.running.nats_url.rsplit(":", 1)[1]
        for pid in children_of(self.running.proc.pid):
            with open(f"/proc/{pid}/cmdline") as f:
                argv = f.read().split("\0")
            if "nats-server" in argv[0] and _flag(argv, "-p") == port:
                return pid
        raise AssertionError("no nats-server child")

    def pid(self, worker_id: str) -> int | None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline") as f:
                    argv = f.read().split("\0")
            except OSError:
                continue
            if _flag(argv, "--worker-id") == worker_id and _flag(argv, "--nats") == self.running.nats_url:
                return int(entry)
        return None

    def signal(self, worker_id: str, sig: signal.Signals) -> int:
        pid = self.pid(worker_id)
        assert pid is not None, f"no process for {worker_id}"
        os.kill(pid, sig)
        return pid

    async def drain(self, worker_id: str) -> None:
        await call(await self._nc(), SUBJECTS, worker_id, "drain", timeout=2.0)

    async def status(self, worker_id: str) -> dict | None:
        try:
            return await call(await self._nc(), SUBJECTS, worker_id, "status", timeout=2.0)
        except AdminCallError:
            return None

    async def statuses(self) -> dict[str, dict | None]:
        return {w: await self.status(w) for w in self.worker_ids}

    async def holder(self, worker_ids: list[str], key: str = "running", timeout: float = 10.0) -> str:
        """The first worker whose status shows `key` > 0 (where a request is now)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for worker_id in worker_ids:
                status = await self.status(worker_id)
                if status and status[key] > 0:
                    return worker_id
            await asyncio.sleep(0.02)
        raise AssertionError(f"no worker of {worker_ids} shows {key} > 0")

    async def wait_back(self, worker_id: str, old_pid: int, timeout: float = 60.0) -> float:
        """Seconds until `worker_id` runs again as a new process and answers its status."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            pid = self.pid(worker_id)
            if pid is not None and pid != old_pid and await self.status(worker_id) is not None:
                return time.monotonic() - started
            await asyncio.sleep(0.2)
        raise AssertionError(f"{worker_id} not back within {timeout:.0f}s")

    async def wait_baseline(self, timeout: float = 20.0, live_only: bool = False) -> dict[str, dict]:
        """Every worker idle again: no KV blocks used, nothing running or waiting.

        `live_only`: workers that are down (being restarted) are not waited for.
        """
        deadline = time.monotonic() + timeout
        while True:
            statuses = await self.statuses()
            if live_only:
                statuses = {w: s for w, s in statuses.items() if s is not None}
            busy = {w: s for w, s in statuses.items() if s is None or s["kv_blocks_used"] or s["running"] or s["waiting"]}
            if not busy:
                return statuses
            if time.monotonic() > deadline:
                raise AssertionError(f"workers not back to baseline after {timeout:.0f}s: {busy}")
            await asyncio.sleep(0.2)


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None
