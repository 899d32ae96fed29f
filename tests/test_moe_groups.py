"""MoE at the seed's shapes, scaled to this machine: prefill TP=2+EP=2 -> decode DP=2+EP=2, real ranks.

Each rank holds only its experts; attention is tensor-parallel on the prefill side and
data-parallel on the decode side, where each DP rank serves its own requests and the two
step together through the MoE layers (an idle one runs an empty batch). Greedy tokens equal
HF transformers on a Qwen3-MoE checkpoint it wrote; a request's KV lands on its DP rank only;
every rank is back to holding nothing after many requests, some cancelled.
"""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest

from shared import processes
from shared.layouts import parse_layout
from tests.engine.hf_checkpoints import _COMMON, hf_greedy, write_checkpoint
from tests.test_rank_groups import Deployment, _instance, admin, cli, plan_of, rank_processes, resident_bytes

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
PROMPTS = [[5 + (i * 13 + n) % 280 for i in range(n)] for n in (7, 30, 12, 45, 19, 3, 26, 38)]  # 8 lengths


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A Qwen3-MoE checkpoint written by transformers: 8 experts (4 per EP rank), top-2, every layer sparse."""
    from transformers import Qwen3MoeConfig

    folder = tmp_path_factory.mktemp("moe")
    config = Qwen3MoeConfig(**_COMMON, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                            num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)
    hf = write_checkpoint(folder, config)
    return str(folder), [hf_greedy(hf, p, MAX_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def deployment(moe):
    from shared.nats_server import EmbeddedNats

    with EmbeddedNats() as server:
        made = Deployment(server.url, moe[0])
        try:
            yield made
        finally:
            made.stop()


def decode_received(deployment: Deployment, worker_id: str) -> dict[int, int]:
    """UCX bytes each rank of a worker received so far."""
    return {row["rank"]: row["ucx_bytes_received"] for row in _instance(admin(deployment.nats_url, "status"), worker_id)["ranks"]}


async def test_tp2_ep2_prefill_to_dp2_ep2_decode_equals_hf_and_each_kv_lands_on_one_dp_rank(moe, deployment):
    expected = moe[1]
    ids = ["p-tp2ep2", "d-dp2ep2"]
    procs = await asyncio.to_thread(deployment.start_workers, (ids[0], "prefill", "tp=2,ep=2", 16), (ids[1], "decode", "dp=2,ep=2", 16))
    try:
        assert [len(rank_processes(p)) for p in procs] == [2, 2]  # 2 + 2 rank processes
        # One request alone: one DP rank works while the other idles (an empty batch each step), no deadlock,
        # and its KV lands whole on the rank that serves it: the other received nothing.
        before = await asyncio.to_thread(decode_received, deployment, ids[1])
        tokens, usage = await deployment.greedy(PROMPTS[3])
        after = await asyncio.to_thread(decode_received, deployment, ids[1])
        assert tokens == expected[3]
        plan = plan_of(deployment.model, "tp=2,ep=2", "dp=2,ep=2", 16, 16)
        grew = {rank: after[rank] - before[rank] for rank in after}
        assert sorted(grew.values()) == [0, plan.nbytes(len(PROMPTS[3]))]  # all of it on one rank, nothing on the other
        assert usage["pdserve"]["kv_transfer_bytes"] == plan.nbytes(len(PROMPTS[3]))
        # Eight at once, of different lengths: spread over both DP ranks, each equal to HF.
        results = await asyncio.gather(*(deployment.greedy(p) for p in PROMPTS))
        final = await asyncio.to_thread(decode_received, deployment, ids[1])
    finally:
        await asyncio.to_thread(deployment.retire, procs, ids)
    assert [tokens for tokens, _ in results] == expected
    assert all(final[rank] > after[rank] for rank in final)  # both DP ranks served some


async def test_ep2_colocated_equals_hf(moe, deployment):
    expected = moe[1]
    await asyncio.to_thread(admin, deployment.nats_url, "policy", "--mode", "colocated")
    procs = await asyncio.to_thread(deployment.start_workers, ("both-dp2ep2", "both", "dp=2,ep=2", 16))
    try:
        results = await asyncio.gather(*(deployment.greedy(p) for p in PROMPTS))
    finally:
        await asyncio.to_thread(deployment.retire, procs, ["both-dp2ep2"])
        await asyncio.to_thread(admin, deployment.nats_url, "policy", "--mode", "disagg")
    assert [tokens for tokens, _ in results] == expected
    assert all(usage["pdserve"]["path"] == "colocated" for _, usage in results)


async def _request_maybe_cancelled(deployment: Deployment, prompt: list[int], cancel_after: int | None) -> None:
    """Streams a request; with `cancel_after`, the client goes away after that many chunks."""
    body = {"model": deployment.model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{deployment.port}/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
            chunks = 0
            async for _ in response.content:
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    return  # leaving the block closes the connection: the gateway cancels on every worker


async def test_every_rank_back_to_baseline_after_100_requests_with_cancellations(deployment):
    ids = ["p-churn", "d-churn"]
    procs = await asyncio.to_thread(deployment.start_workers, (ids[0], "prefill", "tp=2,ep=2", 16), (ids[1], "decode", "dp=2,ep=2", 16))
    rng = random.Random(7)
    try:
        pending = set()
        for i in range(100):
            cancel = rng.choice([None, None, 1, 3, 8])  # about 3 in 5 cancelled, at different phases
            pending.add(asyncio.ensure_future(_request_maybe_cancelled(deployment, PROMPTS[i % len(PROMPTS)], cancel)))
            if len(pending) >= 8:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        for task in await asyncio.gather(*pending, return_exceptions=True):
            assert not isinstance(task, BaseException), task
        deadline, rows = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            status = await asyncio.to_thread(admin, deployment.nats_url, "status")
            rows = {w: _instance(status, w) for w in ids}
            if all(_idle(row) for row in rows.values()):
                break
            await asyncio.sleep(0.5)
    finally:
        await asyncio.to_thread(deployment.retire, procs, ids)
    for worker_id, row in rows.items():
        assert row["requests"] == 0 and row["kv_blocks_used"] == 0, (worker_id, row)
        assert len(row["ranks"]) == 2
        for rank in row["ranks"]:  # every rank, not only the leaders
            assert "error" not in rank, rank
            assert (rank["kv_blocks_used"], rank["block_tables"], rank["kv_sessions"]) == (0, 0, 0), (worker_id, rank)


def _idle(row: dict) -> bool:
    return row["requests"] == 0 and all(r.get("kv_blocks_used") == 0 and r.get("block_tables") == 0 and r.get("kv_sessions") == 0 for r in row["ranks"])


@pytest.fixture(scope="module")
def big_experts(tmp_path_factory):
    """Experts that dominate a process's memory: 8 layers x 16 experts x 3 x 256 x 512 float32 = 201 MB."""
    from transformers import Qwen3MoeConfig

    folder = tmp_path_factory.mktemp("big-experts")
    config = Qwen3MoeConfig(**_COMMON, hidden_size=256, intermediate_size=256, moe_intermediate_size=512, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
                            num_experts_per_tok=2, norm_topk_prob=True)
    write_checkpoint(folder, config)
    return str(folder), config


def test_each_rank_holds_only_its_experts(big_experts, nats_server):
    """Resident memory from the processes: a dp=2,ep=2 rank holds half the experts of a dp=1,ep=1 worker
    (the same attention and dense weights, the same KV cache per rank)."""
    folder, config = big_experts
    workers = {
        layout: processes.spawn(cli("worker", "--nats", nats_server.url, "--model", folder, "--role", "decode",
                                    "--worker-id", f"mem-{layout.replace('=', '').replace(',', '')}", "--layout", layout,
                                    "--kv-cache-tokens", "256"))
        for layout in ("", "dp=2,ep=2")
    }
    try:
        deadline = time.monotonic() + 180
        while len({s["instance"] for s in admin(nats_server.url, "status")["services"] if s["kind"] == "worker"}) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in workers.values())
            time.sleep(0.5)
        whole = resident_bytes(workers[""].pid)
        ranks = [resident_bytes(pid) for pid in rank_processes(workers["dp=2,ep=2"])]
    finally:
        processes.stop(list(workers.values()))
    expert_bytes = config.num_hidden_layers * config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size * 4
    ep = parse_layout("dp=2,ep=2", "decode").ep
    expected_drop = expert_bytes * (1 - 1 / ep)
    assert len(ranks) == 2
    for rank_bytes in ranks:
        assert 0.75 * expected_drop < whole - rank_bytes < 1.25 * expected_drop, (whole, ranks, expected_drop)
