"""No worker (or no scheduler) alive: a prompt 503, never a hang."""

import asyncio
import subprocess
import sys
import time

import aiohttp
import nats
import pytest

from services.admin.client import discover
from shared import processes
from shared.processes import free_port

pytestmark = pytest.mark.slow

BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def start_service(*argv: str) -> subprocess.Popen:
    return processes.spawn([sys.executable, "-m", "services.cli", *argv])


@pytest.fixture
def gateway(nats_server):
    port = free_port()
    proc = start_service("gateway", "--nats", nats_server.url, "--model", "tiny-llama", "--port", str(port))
    try:
        processes.wait_for_port("127.0.0.1", port, timeout=60, proc=proc)
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        processes.stop([proc])


async def timed_post(url: str) -> tuple[int, dict, float]:
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(url, json=BODY) as response:
            return response.status, await response.json(), time.monotonic() - started


async def test_no_scheduler_is_503_at_once(gateway):
    status, body, elapsed = await timed_post(gateway)
    assert status == 503
    assert "scheduler" in body["error"]["message"]
    assert elapsed < 1.0


async def wait_for_scheduler(nats_url: str, timeout: float = 60.0) -> None:
    nc = await nats.connect(nats_url)
    try:
        deadline = time.monotonic() + timeout
        while not [s for s in await discover(nc, "pd", wait_s=0.2) if s["metadata"]["kind"] == "scheduler"]:
            assert time.monotonic() < deadline, "the scheduler never came up"
    finally:
        await nc.close()


async def test_no_worker_is_503_at_once(gateway, nats_server):
    scheduler = start_service("scheduler", "--nats", nats_server.url)
    try:
        await wait_for_scheduler(nats_server.url)
        status, body, elapsed = await timed_post(gateway)
    finally:
        processes.stop([scheduler])
    assert status == 503
    assert "worker" in body["error"]["message"]
    assert elapsed < 1.0


async def health(gateway_url: str) -> tuple[int, dict]:
    root = gateway_url.removesuffix("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{root}/health") as response:
            return response.status, await response.json()


async def test_health_is_503_until_a_worker_path_is_alive_then_200(gateway, nats_server):
    root = gateway.removesuffix("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{root}/live") as response:
            assert response.status == 200  # the process is up, whatever else is missing
    status, body = await health(gateway)
    assert (status, body["missing"]) == (503, ["scheduler"])
    scheduler = start_service("scheduler", "--nats", nats_server.url, "--mode", "colocated")
    worker = None
    try:
        await wait_for_scheduler(nats_server.url)
        await asyncio.sleep(1.1)  # past the cached answer
        status, body = await health(gateway)
        assert (status, body["missing"]) == (503, ["colocated (role=both) worker"])
        assert "tiny-llama" in body["detail"]
        worker = start_service("worker", "--nats", nats_server.url, "--role", "both", "--model", "tiny-llama", "--threads", "1")
        deadline = time.monotonic() + 90
        while (status := (await health(gateway))[0]) != 200:
            assert status == 503 and time.monotonic() < deadline
            await asyncio.sleep(0.3)
        status, body, _ = await timed_post(gateway)
        assert status == 200  # ready means a request is served
    finally:
        processes.stop([p for p in (worker, scheduler) if p is not None])
