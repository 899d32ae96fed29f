"""No worker (or no scheduler) alive: a prompt 503, never a hang."""

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
