"""`pdserve bench ranks`: one worker instance's engine at tp=1 vs tp=2 (..), real rank processes.

For each tp a group of that many processes runs the serving engine exactly as a worker does
(the leader plans and broadcasts every step, the other ranks follow; gloo on CPU), without
NATS or HTTP around it. Measured on the leader, medians over the repeats:
- prefill: one prompt of `--prompt-len` tokens, tokens per second;
- decode: `--batch` running sequences, milliseconds per step (one token each);
- the share of those steps spent in collectives: the tensor-parallel all-reduces and logit
  gather, and the broadcast of the step plan to the other ranks.
All groups run in the same invocation, one after the other, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
import traceback
from pathlib import Path

COLLECTIVES = ("tp_all_reduce", "tp_gather", "plan_broadcast")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="preset, HF folder or .gguf (e.g. wide-llama, a larger random model)")
    parser.add_argument("--tp", default="1,2", help="tensor-parallel sizes to compare (comma-separated)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch", default="1,8", help="decode batch sizes (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="prefills and decode steps measured (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--result-file", type=Path)


def run(args: argparse.Namespace) -> int:
    from shared.processes import free_port

    tps = [int(t) for t in args.tp.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    results = {}
    for tp in tps:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        port = free_port()
        config = dict(model=args.model, prompt_len=args.prompt_len, batches=batches, repeats=args.repeats, threads=args.threads)
        procs = [context.Process(target=_rank_main, args=(rank, tp, port, config, queue)) for rank in range(tp)]
        for proc in procs:
            proc.start()
        try:
            outcome = queue.get(timeout=1800)
        finally:
            for proc in procs:
                proc.join(timeout=120)
                if proc.is_alive():
                    proc.kill()
        if outcome[0] == "error":
            raise RuntimeError(f"tp={tp} rank {outcome[1]} failed:\n{outcome[2]}")
        results[tp] = outcome[1]
    print(f"model {args.model}, prompt {args.prompt_len} tokens, {args.threads} thread(s) per rank, medians of {args.repeats}")
    print(format_table(results, batches))
    if args.result_file:
        args.result_file.write_text(json.dumps(results, indent=2))
    return 0


def format_table(results: dict[int, dict], batches: list[int]) -> str:
    base = results[min(results)]
    rows = [f"{'tp':>3} {'prefill tok/s':>14} {'x tp1':>6} {'coll. %':>8}" + "".join(f" {'b' + str(b) + ' ms/step':>13} {'x tp1':>6} {'coll. %':>8}" for b in batches)]
    for tp, r in sorted(results.items()):
        line = f"{tp:>3} {r['prefill_tokens_per_s']:>14.1f} {r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:>6.2f} {100 * r['prefill_collective_share']:>7.1f}%"
        for b in batches:
            step, ref = r["decode"][str(b)], base["decode"][str(b)]
            line += f" {step['step_ms']:>13.2f} {step['step_ms'] / ref['step_ms']:>6.2f} {100 * step['collective_share']:>7.1f}%"
        rows.append(line)
    rows.append("x tp1: tokens/s ratio for prefill (higher is faster), step time ratio for decode (lower is faster)")
    return "\n".join(rows)


def _rank_main(rank: int, world: int, port: int, config: dict, queue) -> None:
    try:
        import torch

        torch.set_num_threads(config["threads"])
        result = _serve_rank(rank, world, port, config)
        if rank == 0:
            queue.put(("ok", result))
    except BaseException:
        queue.put(("error", rank, traceback.format_exc()))
        raise


def _serve_rank(rank: int, world: int, port: int, config: dict) -> dict | None:
    import asyncio

    from shared.engine.collectives import build_collectives
    from shared.engine.engine import Engine, SchedulingConfig
    from shared.engine.loader import load_model
    from shared.engine.shard import ModelShard
    from shared.engine.step_work import Stop
    from shared.ranks.channel import LeaderChannel
    from shared.ranks.follower import Follower
    from shared.ranks.process_group import RankEnv, join, leave
    from shared.session import RankTransfer

    store = None
    if world > 1:
        store = join(RankEnv(rank, world, rank, "127.0.0.1", port), timeout_s=600)
    shard = ModelShard(tp=world, rank=rank)
    comm = build_collectives(shard)
    loaded = load_model(config["model"], shard=shard, comm=comm)
    tokens = config["prompt_len"] + max(config["batches"]) * 64 + 4096
    engine = Engine(loaded, kv_cache_tokens=tokens, scheduling=SchedulingConfig(max_num_batched_tokens=config["prompt_len"]))
    try:
        if rank != 0:
            asyncio.run(Follower(engine, RankTransfer(rank, transport=None), store).run())
            return None
        if world > 1:
            engine.channel = LeaderChannel(comm)
        result = _measure(engine, comm, config)
        if engine.channel is not None:
            engine.channel.broadcast(Stop("benchmark done"))
        return result
    finally:
        leave()


def _measure(engine, comm, config: dict) -> dict:
    import torch

    from shared.engine.sampling import SamplingParams

    vocab = engine.config.vocab_size
    prompt = [int(t) for t in torch.randint(3, vocab, (config["prompt_len"],), generator=torch.Generator().manual_seed(0))]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    engine.prefill("warm", prompt, one)  # first-call costs (allocations, kernel choice) out of the measurement
    engine.free("warm")
    prefill_s, prefill_share = [], []
    for i in range(config["repeats"]):
        before, started = _collective_seconds(comm), time.perf_counter()
        engine.prefill(f"p{i}", prompt, one)
        elapsed = time.perf_counter() - started
        prefill_s.append(elapsed)
        prefill_share.append((_collective_seconds(comm) - before) / elapsed)
        engine.free(f"p{i}")
    decode = {}
    many = SamplingParams(temperature=0.0, max_tokens=config["repeats"] + 8, ignore_eos=True)
    for batch in config["batches"]:
        ids = [f"b{batch}-{i}" for i in range(batch)]
        for request_id in ids:
            engine.prefill(request_id, prompt[:32], many)
        engine.step()  # warm
        steps, shares = [], []
        for _ in range(config["repeats"]):
            before, started = _collective_seconds(comm), time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - started
            steps.append(elapsed)
            shares.append((_collective_seconds(comm) - before) / elapsed)
        for request_id in ids:
            engine.free(request_id)
        decode[str(batch)] = {"step_ms": 1000 * statistics.median(steps), "collective_share": statistics.median(shares)}
    return {
        "prefill_tokens_per_s": config["prompt_len"] / statistics.median(prefill_s),
        "prefill_collective_share": statistics.median(prefill_share),
        "decode": decode,
        "collective_calls": dict(comm.calls),
    }


def _collective_seconds(comm) -> float:
    return sum(comm.seconds.get(kind, 0.0) for kind in COLLECTIVES)
