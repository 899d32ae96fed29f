"""Any prefill layout to any decode layout, end to end through the real services.

One nats-server, scheduler and gateway serve the whole module; each case starts a prefill
and a decode worker with its layouts and page sizes, checks the greedy tokens against the
colocated path, then drains them (drained workers leave placement at once).
"""

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import pytest

from shared import processes
from shared.engine.loader import load_model_config
from shared.kv_spec import KvSpec, spec_of_model
from shared.layouts import parse_layout
from shared.processes import free_port
from shared.transfer_plan import plan_transfer

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"  # 4 query heads, 2 KV heads, 2 layers
PROMPTS = [[1000 + (i * 7) % 300 for i in range(n)] for n in (5, 37, 70)]  # cross page boundaries
MAX_TOKENS = 12


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *argv]


def admin(nats_url: str, *argv: str) -> dict:
    result = subprocess.run(cli("admin", *argv, "--nats", nats_url, "--json"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class Deployment:
    def __init__(self, nats_url: str, model: str = MODEL):
        self.nats_url = nats_url
        self.model = model
        self.port = free_port()
        self.control = [
            processes.spawn(cli("scheduler", "--nats", nats_url, "--mode", "colocated")),
            processes.spawn(cli("gateway", "--nats", nats_url, "--model", model, "--port", str(self.port))),
        ]
        processes.wait_for_port("127.0.0.1", self.port, timeout=60, proc=self.control[1])

    def start_workers(self, *workers: tuple[str, str, str, int]) -> list[subprocess.Popen]:
        """(worker_id, role, layout, block_size) each; returns once all are placeable."""
        procs = [
            processes.spawn(
                cli("worker", "--nats", self.nats_url, "--model", self.model, "--threads", "1", "--worker-id", wid,
                    "--role", role, "--layout", layout, "--block-size", str(block_size))
            )
            for wid, role, layout, block_size in workers
        ]
        deadline = time.monotonic() + 120
        wanted = {w[0] for w in workers}
        while not wanted <= {w["worker_id"] for w in admin(self.nats_url, "status")["workers"] if not w["draining"]}:
            assert time.monotonic() < deadline, "workers never registered"
            assert all(p.poll() is None for p in procs), "a worker exited during start-up"
            time.sleep(0.3)
        return procs

    def retire(self, procs: list[subprocess.Popen], worker_ids: list[str]) -> None:
        admin(self.nats_url, "drain", *worker_ids)
        for proc in procs:
            assert proc.wait(timeout=30) == 0  # drained workers exit cleanly

    async def greedy(self, prompt: list[int]) -> tuple[list[int], dict]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{self.port}/v1/completions", json=body) as response:
                reply = await response.json()
                assert response.status == 200, reply
        return reply["choices"][0]["token_ids"], reply["usage"]

    def stop(self) -> None:
        processes.stop(self.control)


@pytest.fixture(scope="module")
def deployment():
    from shared.nats_server import EmbeddedNats

    with EmbeddedNats() as server:
        deployment = Deployment(server.url)
        try:
            yield deployment
        finally:
            deployment.stop()


def reference_tokens(deployment: Deployment, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens on the colocated path (one role=both worker), then switch to disagg."""
    procs = deployment.start_workers(("both-ref", "both", "", 16))
    tokens = [asyncio.run(deployment.greedy(p))[0] for p in prompts]
    deployment.retire(procs, ["both-ref"])
    admin(deployment.nats_url, "policy", "--mode", "disagg")
    return tokens


@pytest.fixture(scope="module")
def colocated_tokens(deployment):
    return reference_tokens(deployment, PROMPTS)


def expected_pairs(prefill_layout: str, decode_layout: str, prefill_block: int, decode_block: int, model: str = MODEL) -> int:
    config = load_model_config(model)

    def spec(block: int) -> KvSpec:
        return spec_of_model(config, page_size=block)

    plan = plan_transfer(parse_layout(prefill_layout, "prefill"), parse_layout(decode_layout, "decode"), spec(prefill_block), spec(decode_block))
    return len(plan.pairs)


CASES = [
    ("tp=1", "tp=2", 16, 16),
    ("tp=2", "tp=1", 16, 16),
    ("tp=4", "dp=2,tp=2", 16, 16),  # tp above the 2 KV heads: replicated heads on the prefill side
    ("tp=1", "tp=4", 16, 16),  # replicated heads on the decode side
    ("pp=2", "pp=1", 16, 16),
    ("tp=2", "dp=2,tp=2", 16, 8),  # page size shrinks
    ("pp=2,tp=2", "tp=1", 8, 32),  # page size grows
]


@pytest.mark.parametrize("prefill_layout, decode_layout, prefill_block, decode_block", CASES)
async def test_greedy_tokens_equal_colocated(deployment, colocated_tokens, prefill_layout, decode_layout, prefill_block, decode_block):
    case = f"{prefill_layout}-{decode_layout}-{prefill_block}-{decode_block}".replace("=", "").replace(",", "")
    ids = [f"p-{case}", f"d-{case}"]  # fresh ids: a drained worker lingers in status until its TTL
    procs = await asyncio.to_thread(
        deployment.start_workers,
        (ids[0], "prefill", prefill_layout, prefill_block),
        (ids[1], "decode", decode_layout, decode_block),
    )
    try:
        results = [await deployment.greedy(p) for p in PROMPTS]
    finally:
        await asyncio.to_thread(deployment.retire, procs, ids)
    pairs = expected_pairs(prefill_layout, decode_layout, prefill_block, decode_block)
    for (tokens, usage), expected in zip(results, colocated_tokens):
        assert usage["pdserve"]["path"] == "disagg"
        assert tokens == expected
        assert usage["pdserve"]["kv_transfer_messages"] == pairs  # one UCX message per rank pair with data


async def test_mismatched_dtype_is_refused_by_name(deployment, colocated_tokens):
    procs = await asyncio.to_thread(deployment.start_workers, ("p-f32", "prefill", "", 16))
    bf16 = processes.spawn(
        cli("worker", "--nats", deployment.nats_url, "--model", MODEL, "--threads", "1", "--worker-id", "d-bf16",
            "--role", "decode", "--kv-dtype", "bfloat16")
    )
    try:
        while "d-bf16" not in {w["worker_id"] for w in admin(deployment.nats_url, "status")["workers"]}:
            await asyncio.sleep(0.3)
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{deployment.port}/v1/completions", json=body) as response:
                status, reply = response.status, await response.json()
        # Status comes from heartbeats (one a second): wait for a fresh one before judging.
        deadline = time.monotonic() + 10
        status_d = admin(deployment.nats_url, "status")["workers"]
        while any(w["kv_blocks_used"] for w in status_d) and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            status_d = admin(deployment.nats_url, "status")["workers"]
    finally:
        await asyncio.to_thread(deployment.retire, [procs[0], bf16], ["p-f32", "d-bf16"])
    assert status == 500
    assert "dtype" in reply["error"]["message"]
    assert all(w["kv_blocks_used"] == 0 for w in status_d)  # nothing was written anywhere


SIX_HEAD_PROMPTS = [[3 + (i * 11) % 290 for i in range(n)] for n in (9, 41)]


@pytest.fixture(scope="module")
def six_kv_heads(tmp_path_factory):
    """An HF folder written by transformers: 6 query and 6 KV heads, so tp=3 -> tp=2 is a
    non-integer head ratio (each decode rank takes 3 heads from two prefill ranks)."""
    from transformers import LlamaConfig

    from tests.engine.hf_checkpoints import _COMMON, write_checkpoint

    folder = tmp_path_factory.mktemp("six-kv-heads")
    config = LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=6, head_dim=16, **_COMMON)
    write_checkpoint(folder, config)
    from shared.nats_server import EmbeddedNats

    with EmbeddedNats() as server:
        deployment = Deployment(server.url, model=str(folder))
        try:
            yield deployment, reference_tokens(deployment, SIX_HEAD_PROMPTS)
        finally:
            deployment.stop()


@pytest.mark.parametrize("prefill_layout, decode_layout", [("tp=3", "tp=2"), ("tp=2", "dp=2,tp=3")])
async def test_non_integer_head_ratio(six_kv_heads, prefill_layout, decode_layout):
    deployment, expected = six_kv_heads
    ids = [f"p6-{prefill_layout}-{decode_layout}".replace(",", ""), f"d6-{prefill_layout}-{decode_layout}".replace(",", "")]
    procs = await asyncio.to_thread(
        deployment.start_workers, (ids[0], "prefill", prefill_layout, 16), (ids[1], "decode", decode_layout, 16)
    )
    try:
        results = [await deployment.greedy(p) for p in SIX_HEAD_PROMPTS]
    finally:
        await asyncio.to_thread(deployment.retire, procs, ids)
    pairs = expected_pairs(prefill_layout, decode_layout, 16, 16, model=deployment.model)
    assert pairs > 2  # several source ranks feed each destination rank
    for (tokens, usage), reference in zip(results, expected):
        assert tokens == reference and usage["pdserve"]["path"] == "disagg"
        assert usage["pdserve"]["kv_transfer_messages"] == pairs
