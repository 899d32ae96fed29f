"""`pdserve bench latency`: one request at a time, disaggregated vs colocated, same machine.

For each mode a fresh `pdserve up` runs with the same number of worker processes; after one
unmeasured warm-up, `--repeats` identical requests run back to back. Reported per mode:
median time to first token, median time per output token after the first, and for the
hand-off the KV bytes, UCX seconds and effective bandwidth (from `usage.pdserve`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

# aiohttp, numpy and the tokenizer are imported where used: registering the CLI stays cheap.


@dataclass
class Sample:
    ttft_s: float
    tpot_s: float
    kv_bytes: int
    kv_seconds: float


async def one_request(base_url: str, model: str, prompt_ids: list[int], output_len: int, api_key: str) -> Sample:
    import aiohttp
    import numpy as np

    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stamps, usage = [], None
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(f"{base_url}/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}) as response:
            response.raise_for_status()
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
                usage = chunk.get("usage") or usage
    extension = usage["pdserve"]
    gaps = np.diff(stamps)
    return Sample(
        ttft_s=stamps[0] - started,
        tpot_s=float(gaps.mean()) if len(gaps) else 0.0,
        kv_bytes=extension.get("kv_transfer_bytes", 0),
        kv_seconds=extension.get("kv_transfer_seconds", 0.0),
    )


async def measure(base_url: str, model: str, prompt_ids: list[int], output_len: int, repeats: int, api_key: str) -> list[Sample]:
    await one_request(base_url, model, prompt_ids, output_len, api_key)  # warm-up: caches, UCX endpoints
    return [await one_request(base_url, model, prompt_ids, output_len, api_key) for _ in range(repeats)]


def summarize(samples: list[Sample]) -> dict:
    kv_bytes = statistics.median(s.kv_bytes for s in samples)
    kv_seconds = statistics.median(s.kv_seconds for s in samples)
    return {
        "median_ttft_ms": 1000 * statistics.median(s.ttft_s for s in samples),
        "median_tpot_ms": 1000 * statistics.median(s.tpot_s for s in samples),
        "kv_bytes": int(kv_bytes),
        "kv_transfer_ms": 1000 * kv_seconds,
        "kv_gb_per_s": kv_bytes / kv_seconds / 1e9 if kv_seconds else 0.0,
    }


def format_table(results: dict[str, dict]) -> str:
    rows = [f"{'mode':<14} {'TTFT ms':>9} {'TPOT ms':>9} {'KV bytes':>11} {'KV ms':>8} {'KV GB/s':>8}"]
    for mode, r in results.items():
        rows.append(
            f"{mode:<14} {r['median_ttft_ms']:>9.1f} {r['median_tpot_ms']:>9.2f} {r['kv_bytes']:>11,} "
            f"{r['kv_transfer_ms']:>8.2f} {r['kv_gb_per_s']:>8.3f}"
        )
    if {"disagg", "colocated"} <= results.keys():
        d, c = results["disagg"], results["colocated"]
        rows.append(
            f"disagg/colocated: TTFT x{d['median_ttft_ms'] / c['median_ttft_ms']:.2f}, "
            f"TPOT x{d['median_tpot_ms'] / c['median_tpot_ms']:.2f}"
        )
    return "\n".join(rows)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--input-len", type=int, default=1024, help="prompt tokens (real text)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="measured requests per mode (medians)")
    parser.add_argument("--modes", default="disagg,colocated")
    parser.add_argument(
        "--layouts", default="",
        help="instead of --modes: disaggregated stacks with these PREFILL:DECODE layouts, e.g. tp=1:tp=1,tp=2:tp=3 "
        "(each rank its own process; compares the KV hand-off between rank groups)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--result-file", type=Path)
    parser.add_argument("--log-dir", type=Path, default=Path("bench-results"))


def _stacks(args: argparse.Namespace):
    """(label, StackSpec) of every stack to measure, one after the other."""
    from loadtest.stack import StackSpec

    if not args.layouts:
        return [(mode, StackSpec(model=args.model, mode=mode, workers=2, threads=args.threads)) for mode in args.modes.split(",")]
    stacks = []
    for pair in args.layouts.split(","):
        prefill, sep, decode = pair.partition(":")
        if not sep:
            raise ValueError(f"--layouts: {pair!r} is not PREFILL:DECODE (e.g. tp=2:tp=3)")
        spec = StackSpec(model=args.model, mode="disagg", workers=2, threads=args.threads, prefill_layout=prefill, decode_layout=decode)
        stacks.append((f"{prefill or 'tp=1'}->{decode or 'tp=1'}", spec))
    return stacks


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from loadtest.prompts import PromptSource
    from loadtest.stack import running_stack
    from shared.engine.tokenizer import load_tokenizer

    source = PromptSource(load_tokenizer(args.model))
    prompt_ids = source.token_ids(args.input_len, np.random.default_rng(0))
    results = {}
    for label, spec in _stacks(args):
        api_key = secrets.token_urlsafe(16)
        log_name = label.replace(" ", "-").replace(":", "-").replace("=", "")
        with running_stack(spec, args.log_dir / f"latency-{log_name}.log", api_key=api_key) as base_url:
            samples = asyncio.run(measure(base_url, args.model, prompt_ids, args.output_len, args.repeats, api_key))
        results[label] = summarize(samples)
    print(f"model {args.model}, prompt {args.input_len} tokens, {args.output_len} output tokens, {args.repeats} runs per mode (medians)")
    print(format_table(results))
    if args.result_file:
        args.result_file.write_text(json.dumps(results, indent=2))
    return 0
