"""`pdserve`: the stack in one command, each service alone, and the tools around them."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from services import early_interrupt
from services.gateway import auth as gateway_auth
from shared import nats_auth
from shared.nats_failover import NATS_ENV, nats_urls_from, parse_nats_urls
from shared.shutdown import DEFAULT_DRAIN_TIMEOUT_S

DEFAULT_MODEL = "smollm2-135m"
UP_CREDS_HELP = (
    "with --nats: a directory from `pdserve nats-config` (each service uses its role's file) "
    "or one file for all; without --nats the embedded server gets fresh credentials"
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _nats_urls(text: str) -> str:
    try:
        parse_nats_urls(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_common(parser: argparse.ArgumentParser, needs_nats: bool = True) -> None:
    from_env = nats_urls_from(None)
    parser.add_argument(
        "--nats",
        type=_nats_urls,
        default=from_env,
        required=needs_nats and from_env is None,
        metavar="URL[,URL...]",
        help=f"NATS server URLs of one cluster, tried in order (nearest first), e.g. nats://a:4222,nats://b:4222; default: ${NATS_ENV}",
    )
    parser.add_argument("--prefix", default="pd", help="NATS subject prefix (several deployments on one server)")
    parser.add_argument("--log-level", default=os.environ.get("PDSERVE_LOG_LEVEL", "info"))
    parser.add_argument(
        "--drain-timeout", type=_positive_float, default=DEFAULT_DRAIN_TIMEOUT_S,
        help="on SIGTERM: seconds to finish requests in flight before ending them with an error",
    )  # fmt: skip
    nats_auth.add_arguments(parser, creds_help=None if needs_nats else UP_CREDS_HELP)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="preset (smollm2-135m, tiny-llama, tiny-qwen3, tiny-moe), an HF folder, or a .gguf file")


DTYPES = ("float32", "bfloat16")


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--kv-dtype", choices=DTYPES, default=None, help="KV cache dtype (default: the weights' dtype)")
    parser.add_argument("--kv-cache-tokens", type=_positive_int, default=32768, help="KV cache budget in tokens")
    parser.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV page")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=None,
        help="new tokens per engine step; longer prompts run in chunks (default: 2048 for prefill workers, 512 for decode/both)",
    )
    parser.add_argument("--max-num-seqs", type=_positive_int, default=256, help="requests in one worker's running batch")


def _add_generation_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--generation-config",
        choices=["model", "none"],
        default="model",
        help="sampling settings a request leaves unset: the model's recommended ones (model), or the OpenAI defaults (none)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole stack: nats-server, scheduler, workers, gateway")
    _add_common(up, needs_nats=False)
    _add_model(up)
    _add_worker_options(up)
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    up.add_argument("--port", type=int, default=8000, help="gateway port")
    up.add_argument("--mode", default="disagg", help="disagg | colocated | auto")
    up.add_argument("--prefill", type=_positive_int, default=1, help="number of prefill workers")
    up.add_argument("--decode", type=_positive_int, default=1, help="number of decode workers")
    up.add_argument("--prefill-layout", default="", help="prefill workers' layout, e.g. tp=4,ep=4")
    up.add_argument("--decode-layout", default="", help="decode workers' layout, e.g. dp=4,ep=16 or dp=2,tp=2")
    up.add_argument("--decode-block-size", type=_positive_int, default=None, help="decode workers' KV page size (default: --block-size)")
    up.add_argument("--max-concurrent-requests", type=_positive_int, default=256, help="gateway: in-flight requests before 429")
    up.add_argument("--max-waiting", type=_positive_int, default=64, help="workers: queued requests before 429")
    up.add_argument("--migration-limit", type=_non_negative_int, default=3, help="gateway: times a request may move to other workers when one fails (0: off)")
    _add_generation_config(up)
    gateway_auth.add_arguments(up)
    up.add_argument("--no-api-key", action="store_true", help="serve without API keys (default: --api-key, PDSERVE_API_KEY, or a generated key)")

    scheduler = commands.add_parser("scheduler", help="run the scheduler")
    _add_common(scheduler)
    scheduler.add_argument("--mode", default="disagg", help="disagg | colocated | auto")

    gateway = commands.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    _add_common(gateway)
    _add_model(gateway)
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8000)
    gateway.add_argument("--default-max-tokens", type=_positive_int, default=256)
    gateway.add_argument("--stall-timeout", type=float, default=120.0, help="seconds without a token before a request fails")
    gateway.add_argument("--max-concurrent-requests", type=_positive_int, default=256, help="in-flight requests before 429")
    gateway.add_argument("--migration-limit", type=_non_negative_int, default=3, help="times a request may move to other workers when one fails (0: off)")
    _add_generation_config(gateway)
    gateway_auth.add_arguments(gateway)

    for role, text in (("prefill", "run a prefill worker"), ("decode", "run a decode worker"), ("worker", "run a worker in any role")):
        worker = commands.add_parser(role, help=text)
        _add_common(worker)
        _add_model(worker)
        _add_worker_options(worker)
        worker.add_argument("--worker-id", default=None)
        worker.add_argument("--ucx-host", default="127.0.0.1", help="where peers reach this worker's UCX listener: an address, an interface (eth0) or auto (the default route's interface)")
        worker.add_argument("--layout", default="", help="this worker's parallel layout, e.g. tp=4,ep=4 (prefill) or dp=2,tp=2 (decode)")
        worker.add_argument("--max-waiting", type=_positive_int, default=64, help="queued requests before this worker refuses more (429)")
        worker.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
        worker.add_argument(
            "--dist-timeout", type=_positive_float, default=60.0,
            help="seconds any rank of a multi-rank layout waits for the others (set-up, a collective) before the group is declared failed",
        )
        worker.add_argument(
            "--kv-lease", type=_positive_float, default=10.0,
            help="seconds a KV hand-off may hold memory on either side (prefill KV kept for a decoder, receives posted) before it is released",
        )
        if role == "worker":
            worker.add_argument("--role", choices=["prefill", "decode", "both"], required=True)
    from loadtest.cli import register as register_bench
    from planner.cli import register as register_plan
    from services.admin.cli import register as register_admin
    from services.nats_config import register as register_nats_config

    register_admin(commands.add_parser("admin", help="operate a running deployment over NATS"))
    register_bench(commands.add_parser("bench", help="benchmarks: load tests, colocated vs disagg, hand-off latency"))
    register_plan(commands.add_parser("plan", help="simulate colocated vs disaggregated serving at any scale"))
    register_nats_config(commands.add_parser("nats-config", help="write a nats-server config and per-role credentials for an external NATS"))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        with early_interrupt.Recording() as recording:
            return _main(argv, recording)
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling (still importing)
        return 130


def _main(argv: list[str] | None, recording: early_interrupt.Recording) -> int:
    args = build_parser().parse_args(argv)
    if early_interrupt.received():
        return 130  # interrupted while importing: nothing was started
    if args.command != "up":  # `pdserve up` takes the recorded interrupts over itself
        recording.stop()
    try:
        return _run(args)
    except (nats_auth.NatsCredentialsError, nats_auth.NatsAuthorizationError) as exc:
        print(f"pdserve {args.command}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "up":
        from services.launcher import run_stack

        return run_stack(args)
    if args.command == "bench":
        from loadtest.cli import run as run_bench

        return run_bench(args)
    if args.command == "plan":
        from planner.cli import run as run_plan

        return run_plan(args)
    if args.command == "nats-config":
        from services.nats_config import run as run_nats_config

        return run_nats_config(args)
    if args.command == "admin":
        from services.admin.cli import run as run_admin

        return run_admin(args)
    from shared.shutdown import exit_without_teardown

    if args.command == "scheduler":
        from services.scheduler.main import run

        exit_without_teardown(asyncio.run(run(args)))
    if args.command == "gateway":
        from services.gateway.main import run

        exit_without_teardown(asyncio.run(run(args)))
    from services.worker.main import run

    if args.command != "worker":
        args.role = args.command
    exit_without_teardown(asyncio.run(run(args)))


if __name__ == "__main__":
    sys.exit(main())
