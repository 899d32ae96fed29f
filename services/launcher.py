"""`pdserve up`: the whole stack as child processes of one command.

Start order: nats-server (unless --nats), scheduler, workers, gateway. Ready means
every worker has sent a heartbeat and the gateway's /health answers 200; then one line
with the URL is printed. Until then each service's progress is shown and a child that
dies is named with the last lines of its log (services/startup_progress.py).
SIGINT/SIGTERM, or any child dying, stops every child.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.scheduler.policy import Mode
from services.stack_auth import StackAuth
from services.startup_progress import ReadyCheck, ServiceLogs, StartupError, wait_until_ready
from shared import processes
from shared.nats_permissions import NatsRole
from shared.nats_server import EmbeddedNats
from shared.stack_registry import record_stack
from shared.subjects import Subjects

READY_TIMEOUT_S = 600.0


class StackError(RuntimeError):
    pass


def _worker_plans(mode: Mode, args: argparse.Namespace) -> list[WorkerPlan]:
    decode_block_size = args.decode_block_size or args.block_size
    if mode is Mode.COLOCATED:
        count = args.prefill + args.decode
        return [WorkerPlan(f"both-{i}", "both", args.decode_layout, decode_block_size) for i in range(count)]
    prefills = [WorkerPlan(f"prefill-{i}", "prefill", args.prefill_layout, args.block_size) for i in range(args.prefill)]
    decodes = [WorkerPlan(f"decode-{i}", "decode", args.decode_layout, decode_block_size) for i in range(args.decode)]
    return prefills + decodes


@dataclass(frozen=True)
class WorkerPlan:
    worker_id: str
    role: str
    layout: str
    block_size: int


def _transfer_plan_summary(args: argparse.Namespace, mode: Mode) -> str | None:
    """Validates both layouts against the model (naming the flag) and describes the hand-off."""
    from shared.engine.loader import load_model_config
    from shared.kv_spec import KvSpec, spec_of_model
    from shared.layouts import LayoutError, parse_layout, validate
    from shared.transfer_plan import plan_transfer

    config = load_model_config(args.model)

    def spec(block_size: int) -> KvSpec:
        return spec_of_model(config, page_size=block_size)

    layouts = {}
    for flag, text, kind, block_size in (
        ("--prefill-layout", args.prefill_layout, "prefill", args.block_size),
        ("--decode-layout", args.decode_layout, "decode", args.decode_block_size or args.block_size),
    ):
        try:
            layouts[kind] = parse_layout(text, kind)
            validate(layouts[kind], spec(block_size))
        except LayoutError as exc:
            raise StackError(f"{flag}: {exc}") from None
    if mode is Mode.COLOCATED:
        return None
    plan = plan_transfer(
        layouts["prefill"], layouts["decode"], spec(args.block_size), spec(args.decode_block_size or args.block_size)
    )
    return plan.summary()


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StackError(f"--port {port}: {host}:{port} is not free ({exc.strerror})") from None


def _raise_if_any_failed(children: list[subprocess.Popen]) -> None:
    """Once serving, a worker that exits 0 was drained on purpose; anything else stops the stack."""
    for child in children:
        code = child.poll()
        if code is not None and not (code == 0 and "worker" in child.args):
            raise StackError(f"{' '.join(child.args[3:5])} exited with code {code}")


def run_stack(args: argparse.Namespace) -> int:
    try:
        mode = Mode.parse(args.mode)
    except ValueError as exc:
        print(f"pdserve up: --mode: {exc}", file=sys.stderr)
        return 2
    try:
        _check_port_free(args.host, args.port)
        plan_summary = _transfer_plan_summary(args, mode)
        auth = StackAuth.prepare(args, Subjects(args.prefix))
    except (StackError, ValueError) as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 2
    if plan_summary:
        print(plan_summary, flush=True)

    stop_requested = False

    def request_stop(*_) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    nats = None if args.nats else EmbeddedNats(config=auth.server_config).start()
    nats_url = args.nats or nats.url
    subjects = Subjects(args.prefix)
    workers = _worker_plans(mode, args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(workers))
    base = [sys.executable, "-m", "services.cli"]
    common = ["--nats", nats_url, "--prefix", args.prefix, "--log-level", args.log_level, *auth.nats.tls_flags()]
    commands = {"scheduler": base + ["scheduler", *common, "--mode", mode.value]}
    for worker in workers:
        commands[worker.worker_id] = (
            base
            + ["worker", *common, "--role", worker.role, "--worker-id", worker.worker_id, "--model", args.model]
            + ["--layout", worker.layout, "--block-size", str(worker.block_size)]
            + ["--threads", str(threads), "--kv-cache-tokens", str(args.kv_cache_tokens)]
            + (["--dtype", args.dtype] if args.dtype else [])
            + (["--kv-dtype", args.kv_dtype] if args.kv_dtype else [])
            + ["--metrics-port", str(processes.free_port()), "--max-waiting", str(args.max_waiting)]
            + ["--max-num-seqs", str(args.max_num_seqs)]
            + (["--max-num-batched-tokens", str(args.max_num_batched_tokens)] if args.max_num_batched_tokens else [])
        )
    commands["gateway"] = (
        base
        + ["gateway", *common, "--model", args.model, "--host", args.host, "--port", str(args.port)]
        + ["--max-concurrent-requests", str(args.max_concurrent_requests)]
        + ["--generation-config", args.generation_config]
    )

    children: list[subprocess.Popen] = []
    exit_code = 0
    state_file = None
    try:
        logs = ServiceLogs(Path(tempfile.mkdtemp(prefix="pdserve-up-")))
        # The subcommand (scheduler, worker, gateway) is the NATS role its secrets are for.
        children = [logs.spawn(name, command, env=auth.child_env(NatsRole(command[3]))) for name, command in commands.items()]
        probe_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        ready = ReadyCheck(
            nats_url, subjects, {w.worker_id for w in workers}, "gateway", f"http://{probe_host}:{args.port}/health",
            READY_TIMEOUT_S, lambda: stop_requested, auth.connect_options(NatsRole.ADMIN),
        )
        asyncio.run(wait_until_ready(ready, logs))
        logs.serving()
        gateway_url = f"http://{args.host}:{args.port}/v1"
        state_file = record_stack(os.getpid(), nats_url, args.prefix, gateway_url, auth.creds_file(NatsRole.ADMIN))
        if auth.generated_api_key:
            print(f"pdserve api key: {auth.generated_api_key} (generated; clients send it as Authorization: Bearer)", flush=True)
        print(f"pdserve ready: {gateway_url} (model {args.model}, mode {mode.value}, nats {nats_url})", flush=True)
        while not stop_requested:
            _raise_if_any_failed(children)
            time.sleep(0.2)
    except (StackError, StartupError) as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        exit_code = 1
    finally:
        if state_file is not None:
            state_file.unlink(missing_ok=True)
        processes.stop(list(reversed(children)))  # gateway first, nats-server after all
        if nats is not None:
            nats.stop()
        auth.close()
    return exit_code
