"""Sharded models across real processes (gloo): each rank loads only its shard and the group's
logits and greedy tokens equal HF transformers' on the whole model.

One process group per world size runs several layouts in turn (each builds its own
sub-groups); rank 0 reports. The serving path (`pdserve up` with rank groups) is tested
end to end in tests/test_rank_groups.py; this covers more splits cheaply: uneven MLP
columns, padded vocabulary shards, replicated KV heads, pipeline micro-batches, experts
split by columns and by experts.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback

import pytest
import torch

from tests.engine.hf_checkpoints import _COMMON, hf_greedy, hf_last_logits, prompt_ids, write_checkpoint

MAX_NEW = 6
BLOCK = 4


def _configs():
    from transformers import LlamaConfig, Qwen3MoeConfig

    return {
        # 4 q / 2 kv heads, intermediate 90: uneven over 4, tied head
        "llama-4x2": LlamaConfig(**_COMMON, hidden_size=32, intermediate_size=90, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
        # 6 q / 3 kv heads and one with a single KV head (replicated when tp=3), untied head, biases
        "llama-6x3": LlamaConfig(**_COMMON, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=3, head_dim=8, tie_word_embeddings=False),
        "llama-6x1-bias": LlamaConfig(**_COMMON, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=1, head_dim=8, attention_bias=True,
                                      tie_word_embeddings=False),
        # 4 experts, top-2 renormalised, one dense layer
        "moe-4": Qwen3MoeConfig(**_COMMON, hidden_size=32, intermediate_size=48, moe_intermediate_size=20,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                                tie_word_embeddings=False),
    }


# (world, [(model, dict(tp=, pp=, ep=))])
CASES = {
    2: [("llama-4x2", dict(tp=2)), ("llama-4x2", dict(pp=2)), ("moe-4", dict(tp=2)), ("moe-4", dict(tp=2, ep=2))],
    3: [("llama-6x3", dict(tp=3)), ("llama-6x1-bias", dict(tp=3))],
    4: [("llama-4x2", dict(tp=2, pp=2)), ("llama-4x2", dict(tp=4))],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return {name: (root / name, write_checkpoint(root / name, config)) for name, config in _configs().items()}


def _rank_main(rank: int, world: int, port: int, jobs: list, results) -> None:
    """One rank: joins the group, then runs every job (model folder, layout) and reports from rank 0."""
    try:
        torch.set_num_threads(1)
        from shared.engine.collectives import build_collectives
        from shared.engine.kv_cache import PagedKVCache
        from shared.engine.loader import load_model
        from shared.engine.runner import StepRunner
        from shared.engine.shard import ModelShard
        from shared.engine.step_work import Chunk, Step
        from shared.ranks.process_group import RankEnv, join

        join(RankEnv(rank, world, rank, "127.0.0.1", port), timeout_s=60)
        import torch.distributed as dist

        for folder, dims, prompt in jobs:
            shard = ModelShard(rank=rank, **dims)
            comm = build_collectives(shard)
            loaded = load_model(folder, shard=shard, comm=comm)
            model = loaded.model
            num_blocks = -(-(len(prompt) + MAX_NEW) // BLOCK) + 1
            cache = PagedKVCache(loaded.config, num_blocks, BLOCK, num_layers=model.num_cache_layers, num_kv_heads=model.num_cache_heads)
            runner = StepRunner(model, cache, comm)
            table = list(reversed(range(num_blocks)))  # scrambled pages
            chunk_ids, cached, tokens, first_logits = list(prompt), 0, [], None
            with torch.inference_mode():
                for _ in range(MAX_NEW):
                    step = Step([[Chunk("r", cached, len(chunk_ids), True, chunk_ids)]], {"r": table} if cached == 0 else {})
                    logits = runner.run(step)
                    token = torch.zeros(1, dtype=torch.int64)
                    if rank == 0:
                        first_logits = logits[0] if first_logits is None else first_logits
                        token[0] = int(logits[0].argmax())
                    dist.broadcast(token, 0)  # the leader's choice; in serving it rides in the next Step
                    tokens.append(int(token))
                    cached += len(chunk_ids)
                    chunk_ids = [int(token)]
            params = sum(p.numel() for p in model.parameters())
            if rank == 0:
                results.put(("ok", str(folder), dims, tokens, first_logits.tolist(), params))  # by value: the rank may exit first
        dist.barrier()
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        raise


@pytest.mark.parametrize("world", sorted(CASES))
def test_sharded_logits_and_greedy_tokens_equal_hf(checkpoints, world):
    from shared.processes import free_port

    prompt = prompt_ids(13, seed=world)  # 13 tokens: several pages of 4, micro-batches of uneven size
    jobs = [(str(checkpoints[name][0]), dims, prompt) for name, dims in CASES[world]]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    env_before = dict(os.environ)
    procs = [context.Process(target=_rank_main, args=(r, world, port, jobs, results)) for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        reports = [results.get(timeout=300) for _ in jobs]
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
        os.environ.clear()
        os.environ.update(env_before)
    errors = [r for r in reports if r[0] == "error"]
    assert not errors, errors[0][2]
    for (name, dims), (_, _, got_dims, tokens, logits, params) in zip(CASES[world], reports):
        hf = checkpoints[name][1]
        assert got_dims == dims
        assert (torch.tensor(logits) - hf_last_logits(hf, prompt)).abs().max().item() <= 1e-4, (name, dims)
        assert tokens == hf_greedy(hf, prompt, max_new_tokens=MAX_NEW), (name, dims)
        whole = sum(p.numel() for p in hf.parameters())
        assert params < whole, (name, dims)  # rank 0 holds a part, not the whole model


def _gguf_rank(rank: int, world: int, port: int, path: str, prompt: list[int], results) -> None:
    try:
        torch.set_num_threads(1)
        from shared.engine.collectives import build_collectives
        from shared.engine.engine import Engine
        from shared.engine.loader import load_model
        from shared.engine.shard import ModelShard
        from shared.engine.step_work import Chunk, Step
        from shared.engine.weight_cache import WeightCache
        from shared.ranks.process_group import RankEnv, join

        join(RankEnv(rank, world, rank, "127.0.0.1", port), timeout_s=60)
        shard = ModelShard(tp=world, rank=rank)
        loaded = load_model(path, shard=shard, comm=build_collectives(shard), weight_cache=WeightCache(os.environ["SHARD_TEST_CACHE"]))
        engine = Engine(loaded, kv_cache_tokens=256)  # the serving path: the block twin for decode-sized batches
        runner = engine.runner
        table = list(range(4))
        with torch.inference_mode():
            logits = runner.run(Step([[Chunk("r", 0, len(prompt), True, prompt)]], {"r": table}))
            decode = runner.run(Step([[Chunk("r", len(prompt), 1, True, [prompt[0]])]]))  # one row: the GGUF-block path
        import torch.distributed as dist

        if rank == 0:
            results.put(("ok", logits[0].tolist(), decode[0].tolist(), sorted(loaded.block_weights)))  # by value
        dist.barrier()
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        raise


def test_gguf_shards_and_their_weight_blocks_equal_the_whole_model(tmp_path):
    """A Q8_0 GGUF split over tp=2: each rank cuts its dense slices and its GGUF blocks (rows, and columns on
    whole 32-element blocks); prefill and a one-row decode step equal the whole model's logits."""
    from transformers import LlamaConfig

    from shared.engine.engine import Engine
    from shared.engine.loader import load_model
    from shared.engine.step_work import Chunk, Step
    from shared.engine.weight_cache import WeightCache
    from shared.processes import free_port
    from tests.engine.hf_checkpoints import write_gguf

    config = LlamaConfig(**_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    hf = write_checkpoint(tmp_path / "hf", config)
    path = tmp_path / "llama-q8.gguf"
    write_gguf(path, hf, config, tmp_path / "hf", quantize_q8=True)
    prompt = prompt_ids(11, seed=5)
    whole = load_model(path, weight_cache=WeightCache(tmp_path / "cache"))
    reference = Engine(whole, kv_cache_tokens=256).runner
    with torch.inference_mode():
        want = reference.run(Step([[Chunk("r", 0, len(prompt), True, prompt)]], {"r": list(range(4))}))[0]
        want_decode = reference.run(Step([[Chunk("r", len(prompt), 1, True, [prompt[0]])]]))[0]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    os.environ["SHARD_TEST_CACHE"] = str(tmp_path / "cache")
    procs = [context.Process(target=_gguf_rank, args=(r, 2, port, str(path), prompt, results)) for r in range(2)]
    try:
        for proc in procs:
            proc.start()
        outcome = results.get(timeout=300)
    finally:
        os.environ.pop("SHARD_TEST_CACHE", None)
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    assert outcome[0] == "ok", outcome[2]
    _, logits, decode, blocks = outcome
    assert (torch.tensor(logits) - want).abs().max().item() <= 1e-4
    assert (torch.tensor(decode) - want_decode).abs().max().item() <= 1e-4
    assert "layers.0.attn.o_proj.weight" in blocks and "layers.0.mlp.down_proj.weight" in blocks  # column cuts kept their blocks
    assert "embed_tokens.weight" in blocks  # the tied head's vocabulary rows too
