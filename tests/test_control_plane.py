"""Control plane end to end: admin over NATS micro, auto placement, admission, cancellation, metrics."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.scheduler.registry import WORKER_TTL_S
from shared import processes
from tests.stack import start_stack, stop_stack_group

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"


def admin(*argv: str, env: dict | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "admin", *argv, "--json"], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def prompt_of(num_tokens: int) -> list[int]:
    return [1000 + i % 500 for i in range(num_tokens)]


async def complete(base_url: str, num_prompt_tokens: int, max_tokens: int = 4) -> tuple[int, dict, dict]:
    body = {"model": MODEL, "prompt": prompt_of(num_prompt_tokens), "max_tokens": max_tokens, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/completions", json=body) as response:
            return response.status, await response.json(), dict(response.headers)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    os.environ["PDSERVE_STATE_DIR"] = str(state)  # `pdserve admin` finds this stack without --nats
    running = start_stack("--model", MODEL, "--decode", "2")
    yield running
    del os.environ["PDSERVE_STATE_DIR"]
    assert stop_stack_group(running.proc)


def workers_by_id(nats_url: str) -> dict[str, dict]:
    return {w["worker_id"]: w for w in admin("status", "--nats", nats_url)["workers"]}


async def test_status_lists_every_service_and_each_answers_ping(stack):
    report = admin("status")  # no --nats: found through the running stack's state file
    kinds = sorted(s["kind"] for s in report["services"])
    assert kinds == ["gateway", "scheduler", "worker", "worker", "worker"]
    assert all("status" in s for s in report["services"])
    assert {w["worker_id"] for w in report["workers"]} == {"prefill-0", "decode-0", "decode-1"}

    nc = await nats.connect(stack.nats_url, **stack.admin_nats_options())  # NATS of `pdserve up` admits no anonymous client
    replies = []

    async def collect(msg):
        replies.append(json.loads(msg.data))

    inbox = nc.new_inbox()
    await nc.subscribe(inbox, cb=collect)
    await nc.publish("$SRV.PING", b"", reply=inbox)
    deadline = time.monotonic() + 10
    while len(replies) < len(report["services"]) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)  # and nothing more than one answer per service
    await nc.close()
    instances = sorted(r["metadata"]["instance"] for r in replies if r["name"].startswith("pdserve-"))
    assert instances == sorted(s["instance"] for s in report["services"])


async def test_disconnecting_client_frees_kv_on_both_workers(stack):
    body = {"model": MODEL, "prompt": prompt_of(200), "max_tokens": 6000, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{stack.base_url}/completions", json=body)
        for _ in range(5):  # a few tokens in: the decode worker holds the KV by now
            await response.content.readline()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            holding = [w for w in workers_by_id(stack.nats_url).values() if w["kv_blocks_used"] > 0]
            if holding:
                break
        assert [w["role"] for w in holding] == ["decode"]
        response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = workers_by_id(stack.nats_url)
        if all(w["kv_blocks_used"] == 0 and w["running"] == 0 for w in after.values()):
            break
        await asyncio.sleep(0.2)
    assert all(w["kv_blocks_used"] == 0 and w["running"] == 0 for w in after.values()), after


async def test_admin_cancel_ends_a_request_and_frees_its_kv(stack):
    body = {"model": MODEL, "prompt": prompt_of(50), "max_tokens": 6000, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{stack.base_url}/completions", json=body) as response:
            first = await response.content.readline()
            request_id = json.loads(first[6:])["id"]
            cancelled = admin("cancel", request_id, "--nats", stack.nats_url)
            rest = await asyncio.wait_for(response.content.read(), timeout=10)  # the stream ends, no hang
    assert cancelled["held_by"]
    assert b"cancelled by an operator" in rest
    deadline = time.monotonic() + 10
    while any(w["kv_blocks_used"] for w in workers_by_id(stack.nats_url).values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert all(w["kv_blocks_used"] == 0 for w in workers_by_id(stack.nats_url).values())


async def test_metrics_parse_and_ttft_counts_every_finished_request(stack):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{stack.root_url}/metrics") as response:
            before = {s.name: s.value for f in text_string_to_metric_families(await response.text()) for s in f.samples}
    for _ in range(3):
        status, _, _ = await complete(stack.base_url, 20)
        assert status == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{stack.root_url}/metrics") as response:
            families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    samples = {s.name: s for f in families.values() for s in f.samples}
    ttft_count = samples["pdserve_time_to_first_token_seconds_count"].value
    finished = sum(s.value for s in families["pdserve_requests"].samples if s.name == "pdserve_requests_total")
    assert ttft_count - before.get("pdserve_time_to_first_token_seconds_count", 0) == 3
    assert ttft_count == finished
    assert "pdserve_inter_token_latency_seconds" in families
    assert "pdserve_e2e_request_latency_seconds" in families
    assert samples["pdserve_generation_tokens_total"].value >= 12


async def test_drained_worker_finishes_then_leaves(stack):
    drained = admin("drain", "decode-1", "--nats", stack.nats_url)  # returns once it has left
    assert [(w["worker_id"], w["outcome"]) for w in drained["workers"]] == [("decode-1", "drained")]
    deadline = time.monotonic() + 20
    while "decode-1" in workers_by_id(stack.nats_url) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert "decode-1" not in workers_by_id(stack.nats_url)
    status, reply, _ = await complete(stack.base_url, 20)  # the rest of the stack still serves
    assert status == 200 and reply["usage"]["pdserve"]["decode_worker"] == "decode-0"


async def test_auto_mode_follows_policy_changed_at_run_time():
    running = start_stack("--model", MODEL, "--mode", "auto")
    try:
        url = running.nats_url
        # Make the decode pool a poor prefiller so long prompts are worth handing off.
        admin("policy", "--nats", url, "local_prefill_efficiency=0.01", "remote_min_prompt_tokens=100")
        short = await complete(running.base_url, 20)
        long = await complete(running.base_url, 400)
        admin("policy", "--nats", url, "remote_min_prompt_tokens=100000")
        long_after = await complete(running.base_url, 400)
    finally:
        assert stop_stack_group(running.proc)
    assert short[2]["x-pdserve-path"] == "colocated" and short[1]["usage"]["pdserve"]["path"] == "colocated"
    assert long[2]["x-pdserve-path"] == "disagg" and long[1]["usage"]["pdserve"]["path"] == "disagg"
    assert long_after[2]["x-pdserve-path"] == "colocated"


async def test_429_when_full_and_400_when_larger_than_the_kv_budget():
    running = start_stack("--model", MODEL, "--max-concurrent-requests", "1", "--kv-cache-tokens", "1024")
    try:
        body = {"model": MODEL, "prompt": prompt_of(20), "max_tokens": 900, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{running.base_url}/completions", json=body) as first:
                await first.content.readline()
                status, reply, headers = await complete(running.base_url, 10)
        deadline = time.monotonic() + 15  # the first request's slot frees once its handler unwinds
        status_after = 429
        while status_after == 429 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            status_after, _, _ = await complete(running.base_url, 10)
        too_big, too_big_reply, _ = await complete(running.base_url, 600, max_tokens=600)
        still_serving, _, _ = await complete(running.base_url, 10)
    finally:
        assert stop_stack_group(running.proc)
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert reply["error"]["type"] == "rate_limit_error"
    assert status_after == 200
    assert too_big == 400 and "KV" in too_big_reply["error"]["message"]
    assert still_serving == 200


def test_killed_worker_leaves_status_within_ttl(nats_server):
    argv = [sys.executable, "-m", "services.cli"]
    common = ["--nats", nats_server.url, "--model", MODEL, "--threads", "1"]
    children = [
        processes.spawn(argv + ["scheduler", "--nats", nats_server.url]),
        processes.spawn(argv + ["worker", "--role", "decode", "--worker-id", "victim", *common]),
        processes.spawn(argv + ["worker", "--role", "decode", "--worker-id", "survivor", *common]),
    ]
    try:
        deadline = time.monotonic() + 120
        while set(workers_by_id(nats_server.url)) != {"victim", "survivor"}:
            assert time.monotonic() < deadline, "workers never registered"
            time.sleep(0.5)
        children[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        while "victim" in workers_by_id(nats_server.url):
            time.sleep(0.2)
            assert time.monotonic() - killed_at < WORKER_TTL_S + 3.0, "dead worker still listed"
        assert "survivor" in workers_by_id(nats_server.url)
    finally:
        processes.stop(children)


async def test_worker_metrics_count_the_kv_hand_off(stack):
    status, reply, _ = await complete(stack.base_url, 64)
    assert status == 200 and reply["usage"]["pdserve"]["path"] == "disagg"
    workers = workers_by_id(stack.nats_url)
    moved = {}
    async with aiohttp.ClientSession() as session:
        for worker_id in (reply["usage"]["pdserve"]["prefill_worker"], reply["usage"]["pdserve"]["decode_worker"]):
            async with session.get(f"http://127.0.0.1:{workers[worker_id]['metrics_port']}/metrics") as response:
                text = await response.text()
            samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
            moved[worker_id] = {
                s.labels["direction"]: s.value for s in samples if s.name == "pdserve_worker_kv_transfer_bytes_total"
            }
            assert any(s.name == "pdserve_worker_kv_usage_ratio" for s in samples)
    sent = moved[reply["usage"]["pdserve"]["prefill_worker"]]["sent"]
    received = moved[reply["usage"]["pdserve"]["decode_worker"]]["received"]
    assert sent >= reply["usage"]["pdserve"]["kv_transfer_bytes"] > 0
    assert received >= reply["usage"]["pdserve"]["kv_transfer_bytes"]


def test_loglevel_reaches_every_service(stack):
    services = {s["instance"] for s in admin("status", "--nats", stack.nats_url)["services"]}
    changed = admin("loglevel", "debug", "--nats", stack.nats_url)
    assert {s["instance"] for s in changed["services"]} == services and len(services) >= 4
    assert all(s["level"] == "debug" for s in changed["services"])
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "admin", "loglevel", "chatty", "--nats", stack.nats_url],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and "chatty" in result.stderr
    admin("loglevel", "info", "--nats", stack.nats_url)


async def test_step_token_budget_chunks_long_prompts():
    """`--max-num-batched-tokens` reaches the workers: a long prompt runs in budget-sized chunks."""
    running = start_stack("--model", MODEL, "--mode", "colocated", "--decode", "1", "--max-num-batched-tokens", "32")
    try:
        status, reply, _ = await complete(running.base_url, 200)
        assert status == 200 and reply["usage"]["prompt_tokens"] == 200
        worker = workers_by_id(running.nats_url)[reply["usage"]["pdserve"]["prefill_worker"]]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{worker['metrics_port']}/metrics") as response:
                text = await response.text()
        samples = {
            (s.name, s.labels.get("le")): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.startswith("pdserve_worker_step_prompt_tokens")
        }
        steps = samples[("pdserve_worker_step_prompt_tokens_count", None)]
        assert samples[("pdserve_worker_step_prompt_tokens_sum", None)] == 200
        assert steps >= 200 / 32
        assert samples[("pdserve_worker_step_prompt_tokens_bucket", "32.0")] == steps  # no step above the budget
    finally:
        assert stop_stack_group(running.proc), "pdserve up left processes behind"


async def test_hand_offs_racing_for_a_full_decoder_wait_instead_of_failing():
    """More hand-offs than the decoder's pages hold at once: each waits for room, none is lost."""
    running = start_stack("--model", MODEL, "--kv-cache-tokens", "2048")
    try:
        # Each request reserves 300 + 64 tokens = 23 pages of 16: five fit in 128 pages at once.
        results = await asyncio.gather(*(complete(running.base_url, 300, max_tokens=64) for _ in range(14)))
        assert [status for status, _, _ in results] == [200] * 14, [reply for status, reply, _ in results if status != 200]
        assert all(reply["usage"]["completion_tokens"] == 64 for _, reply, _ in results)
        decoder_id = results[0][1]["usage"]["pdserve"]["decode_worker"]
        deadline = time.monotonic() + 10  # the last request's pages are freed just after its last token is sent
        while workers_by_id(running.nats_url)[decoder_id]["kv_blocks_used"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert workers_by_id(running.nats_url)[decoder_id]["kv_blocks_used"] == 0  # every request's pages came back
    finally:
        assert stop_stack_group(running.proc), "pdserve up left processes behind"
