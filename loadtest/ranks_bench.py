"""`pdserve bench ranks`: one worker instance's engine under several layouts, real rank processes.

For each layout a group of that many processes runs the serving engine exactly as a worker
does (the leader plans and broadcasts every step, the other ranks follow; gloo on CPU),
without NATS or HTTP around it. Measured on the leader, medians over the repeats:
- prefill: one prompt of `--prompt-len` tokens, tokens per second;
- decode: `--batch` running sequences in all (spread over the DP groups), ms per step;
- the share of those steps spent in collectives: tensor-parallel all-reduces and logit
  gathers, the MoE layers' all-gather and all-reduce, and the broadcast of the step plan;
- for data-parallel layouts, the empty batches an idle DP group ran (on every rank).
All layouts run in the same invocation, one after the other, so ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
import traceback
from pathlib import Path

TP_KINDS = ("tp_all_reduce", "tp_gather")
MOE_KINDS = ("moe_all_gather", "moe_all_reduce")
COLLECTIVES = (*TP_KINDS, *MOE_KINDS, "plan_broadcast")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="preset, HF folder or .gguf (wide-llama / wide-moe: larger random models)")
    parser.add_argument("--layouts", default="tp=1;tp=2", help="worker layouts to compare, ';'-separated (e.g. 'tp=1;tp=2' or 'dp=1;dp=2,ep=2')")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch", default="1,8", help="decode batch sizes in all (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="prefills and decode steps measured (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--result-file", type=Path)


def run(args: argparse.Namespace) -> int:
    from shared.layouts import parse_layout
    from shared.processes import free_port

    layouts = [text.strip() for text in args.layouts.split(";")]
    batches = [int(b) for b in args.batch.split(",")]
    results = {}
    for text in layouts:
        layout = parse_layout(text, "decode")
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        config = dict(model=args.model, layout=text, prompt_len=args.prompt_len, batches=batches, repeats=args.repeats,
                      threads=args.threads)
        port = free_port()
        procs = [context.Process(target=_rank_main, args=(rank, layout.world, port, config, queue)) for rank in range(layout.world)]
        for proc in procs:
            proc.start()
        try:
            outcomes = [queue.get(timeout=1800) for _ in procs]
        finally:
            for proc in procs:
                proc.join(timeout=120)
                if proc.is_alive():
                    proc.kill()
        failed = [o for o in outcomes if o[0] == "error"]
        if failed:
            raise RuntimeError(f"{text}: rank {failed[0][1]} failed:\n{failed[0][2]}")
        by_rank = {o[1]: o[2] for o in outcomes}
        results[text] = by_rank[0] | {"empty_batches": {r: by_rank[r]["empty_batch"] for r in sorted(by_rank)}}
    print(f"model {args.model}, prompt {args.prompt_len} tokens, {args.threads} thread(s) per rank, medians of {args.repeats}")
    print(format_table(results, batches))
    if args.result_file:
        args.result_file.write_text(json.dumps(results, indent=2))
    return 0


def format_table(results: dict[str, dict], batches: list[int]) -> str:
    base = next(iter(results.values()))
    head = f"{'layout':<12} {'prefill tok/s':>14} {'ratio':>6} {'coll %':>7}"
    head += "".join(f" {f'b{b} ms/step':>12} {'ratio':>6} {'tp %':>6} {'moe %':>6} {'plan %':>7}" for b in batches)
    rows = [head]
    for name, r in results.items():
        line = f"{name:<12} {r['prefill_tokens_per_s']:>14.1f} {r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:>6.2f}"
        line += f" {100 * r['prefill_shares']['all']:>6.1f}%"
        for b in batches:
            step, ref = r["decode"][str(b)], base["decode"][str(b)]
            shares = step["shares"]
            line += f" {step['step_ms']:>12.2f} {step['step_ms'] / ref['step_ms']:>6.2f} {100 * shares['tp']:>5.1f}% {100 * shares['moe']:>5.1f}% {100 * shares['plan']:>6.1f}%"
        rows.append(line)
        empty = {rank: e for rank, e in r["empty_batches"].items() if e["calls"]}
        if empty:
            rows.append("             empty batches (an idle DP group's MoE turns): " + ", ".join(
                f"rank {rank}: {e['calls']} x {1000 * e['seconds'] / e['calls']:.2f} ms" for rank, e in empty.items()))
    rows.append("ratio: prefill tokens/s against the first layout (higher is faster); decode step time against it (lower is faster)")
    rows.append("tp %, moe %, plan %: share of the step in tensor-parallel collectives, MoE all-gather + all-reduce, plan broadcast")
    return "\n".join(rows)


def _rank_main(rank: int, world: int, port: int, config: dict, queue) -> None:
    try:
        import torch

        torch.set_num_threads(config["threads"])
        queue.put(("ok", rank, _serve_rank(rank, world, port, config)))
    except BaseException:
        queue.put(("error", rank, traceback.format_exc()))
        raise


def _serve_rank(rank: int, world: int, port: int, config: dict) -> dict:
    import asyncio

    from shared.engine.collectives import build_collectives
    from shared.engine.engine import Engine, SchedulingConfig
    from shared.engine.loader import load_model
    from shared.engine.shard import ModelShard
    from shared.engine.step_work import Stop
    from shared.layouts import parse_layout
    from shared.ranks.channel import LeaderChannel
    from shared.ranks.follower import Follower
    from shared.ranks.process_group import RankEnv, join, leave
    from shared.session import RankTransfer

    layout = parse_layout(config["layout"], "decode")
    store = join(RankEnv(rank, world, rank, "127.0.0.1", port), timeout_s=600) if world > 1 else None
    shard = ModelShard.of(layout, rank)
    comm = build_collectives(shard)
    loaded = load_model(config["model"], shard=shard, comm=comm)
    tokens = config["prompt_len"] + max(config["batches"]) * 64 + 4096
    engine = Engine(loaded, kv_cache_tokens=tokens, scheduling=SchedulingConfig(max_num_batched_tokens=config["prompt_len"]))
    try:
        result = {}
        if rank != 0:
            asyncio.run(Follower(engine, RankTransfer(rank, transport=None), store).run())
        else:
            if world > 1:
                engine.channel = LeaderChannel(comm)
            result = _measure(engine, comm, config)
            if engine.channel is not None:
                engine.channel.broadcast(Stop("benchmark done"))
        return result | {"empty_batch": {"calls": comm.calls.get("empty_batch", 0), "seconds": comm.seconds.get("empty_batch", 0.0)}}
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
    prefill_s, prefill_shares = [], []
    for i in range(config["repeats"]):
        before, started = _snapshot(comm), time.perf_counter()
        engine.prefill(f"p{i}", prompt, one)
        elapsed = time.perf_counter() - started
        prefill_s.append(elapsed)
        prefill_shares.append(_shares(comm, before, elapsed))
        engine.free(f"p{i}")
    decode = {}
    many = SamplingParams(temperature=0.0, max_tokens=config["repeats"] + 8, ignore_eos=True)
    for batch in config["batches"]:
        ids = [f"b{batch}-{i}" for i in range(batch)]
        for request_id in ids:  # each goes to the least loaded DP group
            engine.prefill(request_id, prompt[:32], many)
        engine.step()  # warm
        steps, shares = [], []
        for _ in range(config["repeats"]):
            before, started = _snapshot(comm), time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - started
            steps.append(elapsed)
            shares.append(_shares(comm, before, elapsed))
        for request_id in ids:
            engine.free(request_id)
        decode[str(batch)] = {"step_ms": 1000 * statistics.median(steps), "shares": _median_shares(shares)}
    return {
        "prefill_tokens_per_s": config["prompt_len"] / statistics.median(prefill_s),
        "prefill_shares": _median_shares(prefill_shares),
        "decode": decode,
    }


def _snapshot(comm) -> dict[str, float]:
    return {kind: comm.seconds.get(kind, 0.0) for kind in COLLECTIVES}


def _shares(comm, before: dict[str, float], elapsed: float) -> dict[str, float]:
    spent = {kind: comm.seconds.get(kind, 0.0) - before[kind] for kind in COLLECTIVES}
    return {
        "tp": sum(spent[k] for k in TP_KINDS) / elapsed,
        "moe": sum(spent[k] for k in MOE_KINDS) / elapsed,
        "plan": spent["plan_broadcast"] / elapsed,
        "all": sum(spent.values()) / elapsed,
    }


def _median_shares(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}
