"""Real rank groups end to end: every tp/pp rank its own process, holding only its shard, KV moving
rank to rank; greedy tokens equal HF transformers on checkpoints it wrote.

One nats-server, scheduler and gateway per model serve the module; each case starts a prefill
and a decode worker group with its layouts and page sizes, sends concurrent requests, checks
tokens against transformers and each prefill rank's UCX bytes against its segments of the
plan, then drains the group (drained workers leave placement at once).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from shared import processes
from shared.engine.loader import load_model_config
from shared.kv_spec import spec_of_model
from shared.layouts import parse_layout
from shared.processes import alive, children_of, free_port
from shared.transfer_plan import plan_transfer
from tests.engine.hf_checkpoints import _COMMON, hf_greedy, write_checkpoint

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
PROMPTS = [[3 + (i * 11) % 290 for i in range(n)] for n in (9, 41, 23)]  # cross pages of 8, 16 and 32


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *argv]


def admin(nats_url: str, *argv: str) -> dict:
    result = subprocess.run(cli("admin", *argv, "--nats", nats_url, "--json"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def model_configs():
    from transformers import LlamaConfig

    return {
        # 6 query and 6 KV heads: tp=3 -> tp=2 is a non-integer head ratio
        "six-kv": LlamaConfig(**_COMMON, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=6, num_key_value_heads=6, head_dim=16),
        # 4 query over 2 KV heads: tp=4 replicates each KV head on two ranks
        "two-kv": LlamaConfig(**_COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    }


class Deployment:
    """A control plane (nats, scheduler, gateway) for one model; worker groups come and go."""

    def __init__(self, nats_url: str, model: str):
        self.nats_url = nats_url
        self.model = model
        self.port = free_port()
        self.control = [
            processes.spawn(cli("scheduler", "--nats", nats_url, "--mode", "disagg")),
            processes.spawn(cli("gateway", "--nats", nats_url, "--model", model, "--port", str(self.port))),
        ]
        processes.wait_for_port("127.0.0.1", self.port, timeout=60, proc=self.control[1])

    def start_workers(self, *workers: tuple[str, str, str, int], extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
        """(worker_id, role, layout, block_size) each; returns once all are placeable."""
        procs = [
            processes.spawn(
                cli("worker", "--nats", self.nats_url, "--model", self.model, "--worker-id", wid, "--role", role,
                    "--layout", layout, "--block-size", str(block_size), "--kv-cache-tokens", "2048", *extra)
            )
            for wid, role, layout, block_size in workers
        ]
        deadline = time.monotonic() + 180
        wanted = {w[0] for w in workers}
        while not wanted <= {w["worker_id"] for w in admin(self.nats_url, "status")["workers"] if not w["draining"]}:
            assert time.monotonic() < deadline, "workers never registered"
            assert all(p.poll() is None for p in procs), "a worker exited during start-up"
            time.sleep(0.3)
        return procs

    def retire(self, procs: list[subprocess.Popen], worker_ids: list[str]) -> None:
        admin(self.nats_url, "drain", *worker_ids)
        for proc in procs:
            assert proc.wait(timeout=60) == 0  # drained workers (and their ranks) exit cleanly

    async def greedy(self, prompt: list[int], max_tokens: int = MAX_TOKENS) -> tuple[list[int], dict]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{self.port}/v1/completions", json=body) as response:
                reply = await response.json()
                assert response.status == 200, reply
        return reply["choices"][0]["token_ids"], reply["usage"]

    def stop(self) -> None:
        processes.stop(self.control)


def _instance(status: dict, worker_id: str) -> dict:
    """A worker's own status reply inside `pdserve admin status --json`."""
    for entry in status["services"]:
        if entry["instance"] == worker_id:
            return entry["status"]
    raise AssertionError(f"{worker_id} not in status: {sorted(e['instance'] for e in status['services'])}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (folder, HF model, greedy tokens of every prompt)."""
    root = tmp_path_factory.mktemp("rank-groups")
    written = {}
    for name, config in model_configs().items():
        hf = write_checkpoint(root / name, config)
        written[name] = (str(root / name), hf, [hf_greedy(hf, p, MAX_TOKENS) for p in PROMPTS])
    return written


@pytest.fixture(scope="module")
def deployments(models):
    from shared.nats_server import EmbeddedNats

    with EmbeddedNats() as server:
        made = {name: Deployment(server.url, folder) for name, (folder, _, _) in models.items()}
        try:
            yield made
        finally:
            for deployment in made.values():
                deployment.stop()


def plan_of(model: str, prefill_layout: str, decode_layout: str, prefill_block: int, decode_block: int):
    config = load_model_config(model)
    return plan_transfer(
        parse_layout(prefill_layout, "prefill"), parse_layout(decode_layout, "decode"),
        spec_of_model(config, page_size=prefill_block), spec_of_model(config, page_size=decode_block),
    )


def rank_processes(leader: subprocess.Popen) -> list[int]:
    """The leader's pid and its rank children: one OS process per rank."""
    return [leader.pid] + [pid for pid in children_of(leader.pid) if alive(pid)]


CASES = [
    ("six-kv", "tp=2", "tp=3", 16, 16),
    ("six-kv", "tp=3", "tp=1", 16, 8),  # and the page size shrinks
    ("six-kv", "pp=2", "tp=2", 8, 32),  # and the page size grows
    ("two-kv", "tp=1", "tp=4", 16, 16),  # KV heads replicated on the decode side
    ("two-kv", "tp=4", "tp=1", 16, 16),  # ... and on the prefill side
    ("two-kv", "pp=2,tp=2", "tp=1", 16, 16),
    ("two-kv", "tp=2", "dp=2", 16, 16),  # a dense model's decode group of two DP replicas
]


@pytest.mark.parametrize("name, prefill_layout, decode_layout, prefill_block, decode_block", CASES)
async def test_greedy_tokens_equal_hf_across_real_rank_groups(
    models, deployments, name, prefill_layout, decode_layout, prefill_block, decode_block
):
    deployment, expected = deployments[name], models[name][2]
    case = f"{prefill_layout}-{decode_layout}".replace("=", "").replace(",", "")
    ids = [f"p-{name}-{case}", f"d-{name}-{case}"]
    procs = await asyncio.to_thread(
        deployment.start_workers, (ids[0], "prefill", prefill_layout, prefill_block), (ids[1], "decode", decode_layout, decode_block)
    )
    try:
        for proc, layout, kind in zip(procs, (prefill_layout, decode_layout), ("prefill", "decode")):
            assert len(rank_processes(proc)) == parse_layout(layout, kind).world  # one OS process per rank
        results = await asyncio.gather(*(deployment.greedy(p) for p in PROMPTS))  # concurrent requests
        prefill_status = await asyncio.to_thread(lambda: _instance(admin(deployment.nats_url, "status"), ids[0]))
    finally:
        await asyncio.to_thread(deployment.retire, procs, ids)
    plan = plan_of(deployment.model, prefill_layout, decode_layout, prefill_block, decode_block)
    for (tokens, usage), reference in zip(results, expected):
        assert tokens == reference
        assert usage["pdserve"]["path"] == "disagg"
        assert usage["pdserve"]["kv_transfer_messages"] == len(plan.pairs)  # one UCX message per rank pair with data
    # Each prefill rank sent exactly its own segments of the plan, for every request.
    sent = {row["rank"]: row["ucx_bytes_sent"] for row in prefill_status["ranks"]}
    prompt_tokens = [len(p) for p in PROMPTS]
    expected_sent = {
        rank: sum(plan.pair_nbytes(pair, n) for pair in plan.pairs if pair.src_rank == rank for n in prompt_tokens)
        for rank in range(parse_layout(prefill_layout, "prefill").world)
    }
    assert sent == expected_sent


async def test_mismatched_kv_dtype_is_refused_by_name_and_nothing_is_held(deployments):
    deployment = deployments["two-kv"]
    procs = await asyncio.to_thread(deployment.start_workers, ("p-f32", "prefill", "tp=2", 16))
    bf16 = await asyncio.to_thread(deployment.start_workers, ("d-bf16", "decode", "", 16), extra=("--kv-dtype", "bfloat16"))
    try:
        body = {"model": deployment.model, "prompt": PROMPTS[0], "max_tokens": 4}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{deployment.port}/v1/completions", json=body) as response:
                status, reply = response.status, await response.json()
        deadline = time.monotonic() + 10  # status comes from heartbeats (one a second): wait for a fresh one
        while time.monotonic() < deadline:
            rows = [_instance(admin(deployment.nats_url, "status"), w) for w in ("p-f32", "d-bf16")]
            if not any(r["kv_blocks_used"] or r["requests"] for r in rows):
                break
            await asyncio.sleep(0.3)
    finally:
        await asyncio.to_thread(deployment.retire, procs + bf16, ["p-f32", "d-bf16"])
    assert status == 503  # the only decoder cannot take this KV: unavailable, not a server bug
    assert "dtype" in reply["error"]["message"]
    assert not any(r["kv_blocks_used"] or r["requests"] for r in rows)  # nothing written or held anywhere


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Layers big enough that their weights dominate a process's memory (134 MB in float32)."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("wide")
    config = LlamaConfig(**_COMMON, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    write_checkpoint(folder, config, tokenizer=True)
    return str(folder), config


def test_each_rank_holds_only_its_share_of_the_layers(wide_model, nats_server):
    """Resident memory measured from the processes: a tp=2 rank holds half the layer weights of a tp=1 worker."""
    from shared.engine.prepack import packing_available

    folder, config = wide_model
    workers = {}
    for tp in (1, 2):
        workers[tp] = processes.spawn(
            cli("worker", "--nats", nats_server.url, "--model", folder, "--role", "prefill", "--worker-id", f"mem-tp{tp}",
                "--layout", f"tp={tp}", "--kv-cache-tokens", "256")
        )
    try:
        deadline = time.monotonic() + 180
        seen = set()
        while seen != {"mem-tp1", "mem-tp2"}:
            assert time.monotonic() < deadline and all(p.poll() is None for p in workers.values())
            seen = {s["instance"] for s in admin(nats_server.url, "status")["services"] if s["kind"] == "worker"}
            time.sleep(0.5)
        whole = resident_bytes(workers[1].pid)
        ranks = [resident_bytes(pid) for pid in rank_processes(workers[2])]
    finally:
        processes.stop(list(workers.values()))
    assert len(ranks) == 2
    # The layers' float32 weights, from the checkpoint's config (not from our code): q, k, v, o and the MLP.
    h, i = config.hidden_size, config.intermediate_size
    layer_bytes = config.num_hidden_layers * (4 * h * h + 3 * h * i) * 4
    copies = 2 if packing_available() else 1  # the engine's packed twin keeps a second, reordered copy of each linear
    expected_drop = layer_bytes * copies / 2
    for rank_bytes in ranks:
        drop = whole - rank_bytes
        assert 0.75 * expected_drop < drop < 1.25 * expected_drop, (whole, ranks, expected_drop)


def _stream_until_killed(deployment: Deployment, victim: int) -> tuple[float, str, list[str]]:
    """Streams a long request; after a few tokens SIGKILLs `victim`. Returns (seconds from the kill to the
    stream's end, how it ended, the events)."""
    room = 256 - len(PROMPTS[1])  # the test checkpoints' context is 256 tokens
    body = {"model": deployment.model, "prompt": PROMPTS[1], "max_tokens": room, "temperature": 0, "ignore_eos": True, "stream": True}
    killed_at, events = None, []
    with socket.create_connection(("127.0.0.1", deployment.port), timeout=60) as sock:
        payload = json.dumps(body).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        stream = sock.makefile("rb")
        status = stream.readline().decode()
        assert " 200 " in status, status
        for raw in stream:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            events.append(line)
            if killed_at is None and len(events) >= 5:
                os.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
            if line == "data: [DONE]":
                break
    assert killed_at is not None, "the stream ended before the kill"
    last = events[-2] if len(events) >= 2 else ""
    return time.monotonic() - killed_at, last, events


def test_a_killed_rank_ends_its_requests_fast_and_the_group_leaves_no_process(deployments):
    deployment = deployments["two-kv"]
    procs = deployment.start_workers(("p-kill", "prefill", "", 16), ("d-kill", "decode", "tp=2", 16))
    decode_ranks = rank_processes(procs[1])
    assert len(decode_ranks) == 2
    try:
        seconds, last, _ = _stream_until_killed(deployment, victim=decode_ranks[1])  # a follower, mid-stream
        assert seconds < 15, seconds  # answered, not left waiting for the stall timeout
        assert '"error"' in last or '"finish_reason":"length"' in last  # an error event (or a migrated completion)
        assert procs[1].wait(timeout=60) != 0  # the group's leader saw it and stopped serving
        assert not any(alive(pid) for pid in decode_ranks)  # no orphan rank
    finally:
        deployment.retire([procs[0]], ["p-kill"])


def test_group_set_up_fails_with_a_message_instead_of_hanging(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    base = cli("worker", "--nats", "nats://127.0.0.1:1", "--model", "tiny-llama", "--role", "prefill", "--layout", "tp=2",
               "--dist-timeout", "4")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    try:
        port_taken = subprocess.run(base, env={**env, "MASTER_PORT": str(port)}, capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert port_taken.returncode != 0
    assert "rank group set-up failed" in port_taken.stderr and f"127.0.0.1:{port}" in port_taken.stderr
    started = time.monotonic()
    lonely = subprocess.run(base, env={**env, "MASTER_PORT": str(free_port())}, capture_output=True, text=True, timeout=60)
    assert lonely.returncode != 0 and time.monotonic() - started < 40
    assert "timed out" in lonely.stderr and "1/2" in lonely.stderr  # one of two ranks joined
    mismatch = subprocess.run(base, env={**env, "MASTER_PORT": str(free_port()), "WORLD_SIZE": "3"}, capture_output=True, text=True, timeout=60)
    assert mismatch.returncode != 0 and "WORLD_SIZE=3" in mismatch.stderr and "2 ranks" in mismatch.stderr


def _all_rank_pids(up_pid: int) -> dict[str, list[int]]:
    """Per worker id under a `pdserve up`: its leader and rank processes."""
    workers = {}
    for pid in children_of(up_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
        except OSError:
            continue
        if "--worker-id" in argv and alive(pid):
            workers[argv[argv.index("--worker-id") + 1]] = [pid] + [c for c in children_of(pid) if alive(c)]
    return workers


def test_pdserve_up_runs_every_rank_as_its_own_process(models):
    """`pdserve up --prefill-layout tp=2 --decode-layout tp=3`: 2 + 3 engine processes, greedy equal to HF."""
    from tests.stack import start_stack, stop_stack_group

    folder, _, expected = models["six-kv"]
    stack = start_stack("--model", folder, "--prefill-layout", "tp=2", "--decode-layout", "tp=3", "--kv-cache-tokens", "2048")
    try:
        ranks = _all_rank_pids(stack.proc.pid)
        body = {"model": folder, "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}

        async def ask():
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{stack.base_url}/completions", json=body) as response:
                    return response.status, await response.json()

        status, reply = asyncio.run(ask())
    finally:
        assert stop_stack_group(stack.proc)  # every process it started exited by itself
    assert {worker: len(pids) for worker, pids in ranks.items()} == {"prefill-0": 2, "decode-0": 3}
    assert status == 200 and reply["choices"][0]["token_ids"] == expected[1]
    assert reply["usage"]["pdserve"]["kv_transfer_messages"] == len(plan_of(folder, "tp=2", "tp=3", 16, 16).pairs)


def test_torchrun_starts_the_same_worker_as_a_rank_group(models, deployments):
    """The worker entry point under `torchrun` (env:// rendezvous, nothing spawned by the worker)."""
    deployment, expected = deployments["two-kv"], models["two-kv"][2]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                "-m", "services.cli", "worker", "--nats", deployment.nats_url, "--model", deployment.model,
                "--role", "decode", "--worker-id", "d-torchrun", "--layout", "tp=2", "--kv-cache-tokens", "2048"]
    group = processes.spawn(torchrun)
    prefill = None
    try:
        prefill = deployment.start_workers(("p-torchrun", "prefill", "", 16))
        deadline = time.monotonic() + 180
        while "d-torchrun" not in {s["instance"] for s in admin(deployment.nats_url, "status")["services"]}:
            assert time.monotonic() < deadline and group.poll() is None, "the torchrun group never registered"
            time.sleep(0.5)
        tokens, usage = asyncio.run(deployment.greedy(PROMPTS[2]))
        ranks = _instance(admin(deployment.nats_url, "status"), "d-torchrun")["ranks"]
    finally:
        if prefill is not None:
            deployment.retire(prefill, ["p-torchrun"])
        admin(deployment.nats_url, "drain", "d-torchrun")
        assert group.wait(timeout=60) == 0  # the leader stopped its ranks, torchrun exited cleanly
    assert tokens == expected[2] and usage["pdserve"]["decode_worker"] == "d-torchrun"
    assert [r["rank"] for r in ranks] == [0, 1] and len({r["pid"] for r in ranks}) == 2
