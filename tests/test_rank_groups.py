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
