"""`pdserve admin` against a real tiny stack: every --json output validates, --watch, drain progress.

One `pdserve up` (tiny-llama, two colocated workers) for the module; the drain test runs
last because it leaves the stack without workers.
"""

import asyncio
import contextlib
import json
import signal
import sys
import time

import aiohttp
import jsonschema
import pytest

from services.admin.client import AdminSession
from services.admin.connection import connect_admin
from services.admin.schema import load_schema
from services.admin.status import take_status
from shared.subjects import Subjects
from tests.stack import start_stack, stop_stack_group

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def stack():
    running = start_stack("--model", MODEL, "--mode", "colocated", "--threads", "1")
    yield running
    assert stop_stack_group(running.proc), "pdserve up left processes behind"


async def admin(stack, *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "admin", *argv, "--nats", stack.nats_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, stdout.decode(), stderr.decode()


@contextlib.asynccontextmanager
async def long_request(stack, max_tokens: int):
    """A streamed completion keeping one worker busy; leaving the block early cancels it."""
    body = {"model": MODEL, "prompt": [1000 + i for i in range(40)], "max_tokens": max_tokens, "ignore_eos": True}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{stack.base_url}/completions", json=body) as response:
            assert response.status == 200
            yield response


async def completion_tokens(response: aiohttp.ClientResponse) -> int:
    """The stream's usage chunk, read to the end of the stream."""
    chunks = [json.loads(line[6:]) for line in (await response.read()).splitlines() if line.startswith(b"data: {")]
    return chunks[-1]["usage"]["completion_tokens"]


async def workers(stack) -> list[dict]:
    nc = await connect_admin(stack.nats_url, timeout=5.0)
    try:
        return (await take_status(AdminSession(nc, stack.nats_url, Subjects("pd"), 5.0)))["workers"]
    finally:
        await nc.close()


async def worker_holding_a_request(stack) -> tuple[str, list[dict]]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = await workers(stack)
        busy = [w["worker_id"] for w in now if w["in_flight"] > 0]
        if busy:
            return busy[0], now
        await asyncio.sleep(0.1)
    raise AssertionError("no worker took the request")


async def until_idle(stack) -> None:
    deadline = time.monotonic() + 20
    while any(w["in_flight"] for w in await workers(stack)):
        assert time.monotonic() < deadline, "a request stayed on a worker"
        await asyncio.sleep(0.1)


async def test_every_json_output_validates_against_its_schema(stack):
    commands = {
        "status": ["status"],
        "policy": ["policy"],
        "loglevel": ["loglevel", "info"],
        "cancel": ["cancel", "chatcmpl-not-running"],
        "requests": ["requests"],
    }
    results = await asyncio.gather(*(admin(stack, *argv, "--json") for argv in commands.values()))
    outputs = {}
    for name, (code, stdout, stderr) in zip(commands, results):
        assert code == 0 or name == "requests", (name, stderr)  # requests: the workers' endpoint may not exist yet
        outputs[name] = json.loads(stdout)
        jsonschema.validate(outputs[name], load_schema(name))
    status = outputs["status"]
    assert sorted(w["worker_id"] for w in status["workers"]) == ["both-0", "both-1"]
    assert all(w["in_flight"] == 0 and w["generated_tokens_total"] >= 0 for w in status["workers"])
    assert sorted(s["kind"] for s in status["services"]) == ["gateway", "scheduler", "worker", "worker"]
    assert [s["policy"]["mode"] for s in outputs["policy"]["schedulers"]] == ["colocated"]
    assert len(outputs["loglevel"]["services"]) == 4 and outputs["cancel"]["held_by"] == []


async def watch(stack, *flags: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "admin", "status", "--watch", "--interval", "0.5", *flags, "--nats", stack.nats_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_watch_without_a_terminal_prints_snapshots_until_sigint(stack):
    async with long_request(stack, 2000):  # cancelled when the watch is done
        busy, _ = await worker_holding_a_request(stack)
        plain, as_json = await watch(stack), await watch(stack, "--json")
        snapshots = [json.loads(await asyncio.wait_for(as_json.stdout.readline(), 20)) for _ in range(3)]
        lines = [(await asyncio.wait_for(plain.stdout.readline(), 20)).decode() for _ in range(6)]
        for proc in (plain, as_json):
            proc.send_signal(signal.SIGINT)
        codes = [await asyncio.wait_for(proc.wait(), 10) for proc in (plain, as_json)]
    stderr = [(await proc.stderr.read()).decode() for proc in (plain, as_json)]
    assert codes == [0, 0], stderr  # Ctrl-C is the way out, not an error
    assert stderr == ["", ""]
    for report in snapshots:
        jsonschema.validate(report, load_schema("status"))
    assert snapshots[0]["time"] < snapshots[1]["time"] < snapshots[2]["time"]
    rates = {w["worker_id"]: w["rates"] for w in snapshots[2]["workers"]}  # from the second snapshot on
    assert rates[busy]["generated_tokens_per_s"] > 0
    assert "\x1b[" not in "".join(lines)  # no screen control codes into a pipe
    assert sum(f" {busy} role=both" in line for line in lines) >= 2  # one line per worker per snapshot
    assert any("gen_tok/s=" in line and "gen_tok/s=-" not in line for line in lines)


async def test_drain_reports_progress_then_what_it_ended(stack):
    await until_idle(stack)  # the previous test's cancelled request has left
    async with long_request(stack, 500) as response:
        busy, now = await worker_holding_a_request(stack)
        idle = next(w["worker_id"] for w in now if w["worker_id"] != busy)
        (code, stdout, stderr), (idle_code, idle_stdout, _) = await asyncio.gather(
            admin(stack, "drain", busy, "--wait", "60"), admin(stack, "drain", idle, "--json")
        )
        streamed = await completion_tokens(response)
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[0].startswith(f"{busy} draining: 1 request left after"), lines  # progress from the start
    assert lines[-1].startswith(f"{busy} drained: finished 1 request in "), lines
    assert streamed == 500  # drained, not cut short
    assert idle_code == 0
    report = json.loads(idle_stdout)
    jsonschema.validate(report, load_schema("drain"))
    [entry] = report["workers"]
    assert (entry["worker_id"], entry["outcome"], entry["requests_at_start"], entry["requests_left"]) == (idle, "drained", 0, 0)
