"""`pdserve bench serve` and `pdserve bench compare`: argument parsing and the two commands.

Wiring into another CLI: `register(bench_parser)` adds the sub-commands, `run(args)`
executes the parsed arguments and returns the exit code. Standalone:
`python -m loadtest.cli serve --url http://127.0.0.1:8000/v1 --model tiny-llama ...`.

Imports of numpy, aiohttp and matplotlib happen inside `run`, so registering the parser
costs nothing to other commands.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

WORKLOAD_CHOICES = ("fixed", "random", "long-prompt", "chat-mix", "trace")
SERVE_DEFAULT_REQUESTS = 100


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_lengths(group: argparse._ArgumentGroup, default: str) -> None:
    """The length flags (`pdserve bench` and `pdserve plan` share them, so they mean the same)."""
    group.add_argument("--workload", choices=WORKLOAD_CHOICES, default=default, help=f"length distribution (default {default})")
    group.add_argument("--input-len", type=_positive_int, default=256, help="prompt tokens for fixed/random (default 256)")
    group.add_argument("--output-len", type=_positive_int, default=32, help="output tokens for fixed/random (default 32)")
    group.add_argument("--range-ratio", type=float, default=0.5, help="random: lengths uniform in len*(1±ratio) (default 0.5)")
    group.add_argument("--trace", type=Path, help="JSONL trace (timestamp, input_length, output_length); implies --workload trace")
    group.add_argument("--trace-time-unit", choices=("ms", "s"), default="ms", help="unit of the trace timestamps (default ms)")
    group.add_argument("--trace-speedup", type=_positive_float, default=1.0, help="divide trace send times by this (default 1)")
    group.add_argument("--trace-length-scale", type=_positive_float, default=1.0, help="multiply trace lengths by this (default 1)")


def _add_workload(parser: argparse.ArgumentParser, default: str) -> None:
    group = parser.add_argument_group("workload")
    add_lengths(group, default)
    group.add_argument("--tokenizer", help="preset name or tokenizer.json path for building prompts (default: --model)")
    group.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                       help="completions: prompt as token ids, exact input length (default); chat: text prompt plus the server's template")


def add_arrivals(group: argparse._ArgumentGroup, default_rate: float | None, default_requests: int | None,
                 rate_help: str = "", requests_help: str = "stop after this many requests") -> None:
    """The arrival flags (`pdserve bench` and `pdserve plan` share them)."""
    rate_help = rate_help or f"open-loop arrivals per second; inf sends all at once (default {default_rate:g})"
    group.add_argument("--request-rate", type=_positive_float, default=default_rate, help=rate_help)
    group.add_argument("--burstiness", type=_positive_float, default=1.0, help="gamma shape of inter-arrival gaps: 1 Poisson, <1 burstier (default 1)")
    group.add_argument("--concurrency", type=_positive_int, help="closed loop with this many requests in flight (instead of --request-rate)")
    group.add_argument("--num-requests", type=_positive_int, default=default_requests, help=requests_help)
    group.add_argument("--duration", type=_positive_float, help="stop sending after this many seconds (in-flight requests finish)")
    group.add_argument("--seed", type=int, default=0, help="seed of arrivals, lengths and prompts (default 0)")


def _add_load(parser: argparse.ArgumentParser, default_rate: float, default_requests: int | None) -> None:
    group = parser.add_argument_group("load")
    add_arrivals(group, default_rate, default_requests)
    group.add_argument("--request-timeout", type=_positive_float, default=300.0, help="seconds before a request counts as failed (default 300)")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    group.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="do not send ignore_eos (servers without the extension)")
    group.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the unmeasured first request that checks the endpoint")


def _add_reporting(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reporting")
    group.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS", help="SLOs for goodput, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2el)")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line on stderr")


def register(bench: argparse.ArgumentParser) -> None:
    """Adds `serve`, `compare` and `latency` under the given `bench` parser."""
    commands = bench.add_subparsers(dest="bench_command", required=True, metavar="{serve,compare,latency,engine}")

    serve = commands.add_parser("serve", help="load-test any OpenAI-compatible endpoint",
                                description="Streams requests at an OpenAI-compatible server and measures TTFT, inter-token latency and throughput.")
    serve.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    serve.add_argument("--model", required=True, help="model name to send (and tokenizer, unless --tokenizer)")
    serve.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY") or None, help="sent as Authorization: Bearer (default: env PDSERVE_API_KEY)")
    serve.add_argument("--workers", type=_positive_int, default=1, help="divisor for per-worker throughput (default 1)")
    serve.add_argument("--result-file", type=Path, help="write the result JSON here")
    serve.add_argument("--plot-dir", type=Path, help="write ttft_cdf.png and itl_over_time.png here")
    _add_workload(serve, default="fixed")
    _add_load(serve, default_rate=float("inf"), default_requests=None)
    _add_reporting(serve)

    compare = commands.add_parser("compare", help="colocated vs disaggregated on local stacks, side by side",
                                  description="Starts `pdserve up` once per mode with the same worker count and replays the same schedule against each.")
    compare.add_argument("--modes", default="colocated,disagg", help="comma-separated; the first is the baseline (default colocated,disagg)")
    compare.add_argument("--model", default="tiny-llama", help="preset to serve (default tiny-llama)")
    compare.add_argument("--workers", type=_positive_int, default=2, help="worker processes per stack, >= 2 (default 2)")
    compare.add_argument("--prefill-workers", type=_positive_int, help="disagg: prefill workers out of --workers (default half)")
    compare.add_argument("--threads", type=_positive_int, help="torch threads per worker (default: pdserve up's choice, cores / workers)")
    compare.add_argument("--ready-timeout", type=_positive_float, default=600.0, help="seconds to wait for each stack (default 600)")
    compare.add_argument("--out-dir", type=Path, default=Path("bench-compare"), help="compare.json, compare.png, stack logs (default ./bench-compare)")
    _add_workload(compare, default="long-prompt")
    _add_load(compare, default_rate=8.0, default_requests=60)
    _add_reporting(compare)

    from loadtest import handoff_latency

    latency = commands.add_parser("latency", help="one request at a time: TTFT, TPOT and KV hand-off, disagg vs colocated")
    handoff_latency.register(latency)

    from loadtest import engine_bench

    engine = commands.add_parser("engine", help="the engine alone: prefill and decode tokens/s vs HF transformers")
    engine_bench.register(engine)

    from loadtest import ranks_bench

    ranks = commands.add_parser("ranks", help="one worker's engine as real rank groups of several layouts: step times, collectives' share")
    ranks_bench.register(ranks)


def run(args: argparse.Namespace) -> int:
    """Executes a parsed `bench serve` / `bench compare`; returns the exit code."""
    from loadtest.runner import WarmupFailed
    from loadtest.stack import StackFailed

    try:
        if args.bench_command == "serve":
            return _serve(args)
        if args.bench_command == "latency":
            from loadtest import handoff_latency

            return handoff_latency.run(args)
        if args.bench_command == "engine":
            from loadtest import engine_bench

            return engine_bench.run(args)
        if args.bench_command == "ranks":
            from loadtest import ranks_bench

            return ranks_bench.run(args)
        return _compare(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pdserve bench {args.bench_command}: {exc}", file=sys.stderr)
        return 2
    except (WarmupFailed, StackFailed) as exc:
        print(f"pdserve bench {args.bench_command}: {exc}", file=sys.stderr)
        return 1


def workload_from_args(args: argparse.Namespace):
    from loadtest import workloads

    if args.trace is not None or args.workload == "trace":
        if args.trace is None:
            raise ValueError("--workload trace needs --trace PATH")
        records = workloads.load_trace(args.trace, args.trace_time_unit, args.trace_length_scale)
        return workloads.Trace(args.trace.name, tuple(records), args.trace_speedup)
    if args.workload == "fixed":
        return workloads.fixed(args.input_len, args.output_len)
    if args.workload == "random":
        return workloads.uniform_around(args.input_len, args.output_len, args.range_ratio)
    return workloads.PRESET_MIXES[args.workload]


def plan_from_args(args: argparse.Namespace):
    """The bench `Plan` (workload, arrivals, limits, seed) the workload and arrival flags describe."""
    from loadtest.bench import Plan, open_or_closed
    from loadtest.runner import Limits
    from loadtest.workloads import Trace

    workload = workload_from_args(args)
    num_requests, duration = args.num_requests, args.duration
    if num_requests is None and duration is None and not isinstance(workload, Trace):
        num_requests = SERVE_DEFAULT_REQUESTS
    if num_requests is None and duration is None:
        num_requests = len(workload.records)
    load = open_or_closed(args.request_rate, args.burstiness, args.concurrency)
    return Plan(workload, load, Limits(num_requests, duration), args.seed)


def _source_and_reporting(args: argparse.Namespace, workers: int):
    from loadtest.bench import Reporting
    from loadtest.metrics import SLO
    from loadtest.prompts import PromptSource, load_tokenizer

    tokenizer_id = args.tokenizer or args.model
    source = PromptSource(load_tokenizer(tokenizer_id))
    return source, Reporting(workers, SLO.parse(args.goodput), args.progress, tokenizer_id)


def _target(args: argparse.Namespace, url: str):
    from loadtest.client import Endpoint, Target

    endpoint = Endpoint.CHAT if args.endpoint == "chat" else Endpoint.COMPLETIONS
    return Target(url, args.model, endpoint, args.request_timeout, args.temperature, args.ignore_eos, getattr(args, "api_key", None))


def _serve(args: argparse.Namespace) -> int:
    from loadtest.bench import run_bench
    from loadtest.plots import save_run_plots
    from loadtest.report import format_summary, write_json

    plan = plan_from_args(args)
    source, reporting = _source_and_reporting(args, args.workers)
    print(f"bench serve: {args.url}, {plan.workload.name}, {plan.describe_load()}", file=sys.stderr)
    result = asyncio.run(run_bench(_target(args, args.url), plan, source, reporting, warmup=args.warmup))
    print(format_summary(result))
    if args.result_file is not None:
        write_json(args.result_file, result)
        print(f"result: {args.result_file}")
    if args.plot_dir is not None:
        for path in save_run_plots(result, args.plot_dir):
            print(f"plot: {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from loadtest.compare import Comparison, run_compare

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    comparison = Comparison(modes, args.model, args.workers, args.prefill_workers, args.threads)
    plan = plan_from_args(args)
    source, reporting = _source_and_reporting(args, args.workers)
    document = run_compare(comparison, plan, lambda url: _target(args, url), source, reporting, args.out_dir, args.ready_timeout)
    print(document["table"])
    print(f"result: {args.out_dir / 'compare.json'}\nplot: {document['plot']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve bench", description="Load generator for OpenAI-compatible servers.")
    register(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
