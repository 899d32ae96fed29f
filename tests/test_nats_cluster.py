"""Services on a three-node NATS cluster keep serving when a node dies.

Each service lists every node, its own preferred one first (`--nats a,b,c`, or
`PDSERVE_NATS`); the gateway's node is killed mid-run, and requests go on being served.
"""

import asyncio
import os
import subprocess
import sys
import time

import aiohttp
import pytest

from shared import processes
from shared.nats_failover import NATS_ENV
from shared.nats_server import NatsCluster
from shared.processes import free_port

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
BODY = {"model": MODEL, "prompt": "The cluster", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def service(*argv: str, env: dict | None = None) -> subprocess.Popen:
    return processes.spawn([sys.executable, "-m", "services.cli", *argv], env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def cluster():
    with NatsCluster(3) as nats_cluster:
        yield nats_cluster


@pytest.fixture(scope="module")
def stack(cluster):
    port = free_port()
    procs = [
        service("scheduler", "--nats", cluster.url_list(1), "--mode", "colocated"),
        # The worker takes its URLs from the environment, as a container would.
        service("worker", "--role", "both", "--model", MODEL, "--threads", "1", "--worker-id", "both-0",
                env={NATS_ENV: cluster.url_list(2)}),
        service("gateway", "--nats", cluster.url_list(0), "--model", MODEL, "--port", str(port)),
    ]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        processes.stop(procs)


async def get_health(base: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/health") as response:
            return response.status


async def complete(base: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.post(f"{base}/v1/completions", json=BODY) as response:
            return response.status, await response.json()


async def until_healthy(base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await get_health(base) == 200:
                return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "the stack never became ready"
        await asyncio.sleep(0.2)


def clients_of(node) -> set[str]:
    return {c.get("name") for c in node.monitor("connz").get("connections") or []}


async def test_services_connect_to_their_first_node(cluster, stack):
    await until_healthy(stack, 90)
    assert "pd-gateway" in clients_of(cluster.nodes[0])
    assert "pd-scheduler" in clients_of(cluster.nodes[1])
    assert "pd-both-0" in clients_of(cluster.nodes[2])  # from PDSERVE_NATS
    status, body = await complete(stack)
    assert status == 200 and body["usage"]["completion_tokens"] == 4


async def test_killing_the_gateways_node_keeps_the_stack_serving(cluster, stack):
    await until_healthy(stack, 90)
    status, before = await complete(stack)
    assert status == 200
    cluster.nodes[0].kill()
    started = time.monotonic()
    while (status := (await complete(stack))[0]) != 200:  # a request caught mid-failover may get a 503
        assert status == 503 and time.monotonic() - started < 15, f"got {status} after the node died"
        await asyncio.sleep(0.1)
    failover_s = time.monotonic() - started
    assert "pd-gateway" in clients_of(cluster.nodes[1]) | clients_of(cluster.nodes[2])
    for _ in range(5):
        status, after = await complete(stack)
        assert status == 200
        assert after["choices"][0]["text"] == before["choices"][0]["text"]  # greedy: the same answer
    await asyncio.sleep(1.1)  # past the cached answer: /health asks the scheduler afresh
    assert await get_health(stack) == 200
    print(f"first request served {failover_s:.2f}s after the gateway's NATS node died")
