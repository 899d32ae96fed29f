"""`pdserve up`: the whole stack as child processes of one command.

Start order: nats-server (unless --nats), scheduler, workers, gateway. Ready means
every worker has sent a heartbeat and the gateway's /health answers 200; then one line
with the URL is printed. Until then each service's progress is shown and a child that
dies is named with the last lines of its log (services/startup_progress.py).
While serving, children that die are restarted (services/supervisor.py). SIGINT/SIGTERM
stops the stack in order (gateway drains, workers, scheduler, nats-server); a second one
kills every child at once. An interrupt during start-up stops whatever was started: a
worker still loading exits at once on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services import early_interrupt
from services.scheduler.policy import Mode
from services.stack_auth import StackAuth
from services.startup_progress import ReadyCheck, ServiceLogs, StartupError, wait_until_ready
from services.supervisor import Child, Stage, StackError, Supervisor
from shared import processes
from shared.nats_permissions import NatsRole
from shared.nats_server import EmbeddedNats
from shared.stack_registry import record_stack
from shared.subjects import Subjects

READY_TIMEOUT_S = 600.0
SUPERVISE_POLL_S = 0.2


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

    signals = _Signals()
    nats = None
    supervisor = Supervisor()
    exit_code = 0
    state_file = None
    logs = None
    try:
        if not args.nats:
            nats = EmbeddedNats(config=auth.server_config)
            supervisor.add(Child("nats-server", Stage.NATS, lambda: nats.start().process))
        nats_url = args.nats or nats.url
        subjects = Subjects(args.prefix)
        workers = _worker_plans(mode, args)
        logs = ServiceLogs(Path(tempfile.mkdtemp(prefix="pdserve-up-")))
        for child in _service_children(args, mode, nats_url, workers, auth, logs):
            if signals.stop_requested:
                raise StackError("interrupted before the stack was ready")
            supervisor.add(child)
        probe_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        ready = ReadyCheck(
            nats_url, subjects, {w.worker_id for w in workers}, "gateway", f"http://{probe_host}:{args.port}/health",
            READY_TIMEOUT_S, lambda: signals.stop_requested, auth.connect_options(NatsRole.ADMIN),
        )
        asyncio.run(wait_until_ready(ready, logs))
        logs.serving()
        gateway_url = f"http://{args.host}:{args.port}/v1"
        state_file = record_stack(os.getpid(), nats_url, args.prefix, gateway_url, auth.creds_file(NatsRole.ADMIN))
        if auth.generated_api_key:
            print(f"pdserve api key: {auth.generated_api_key} (generated; clients send it as Authorization: Bearer)", flush=True)
        print(f"pdserve ready: {gateway_url} (model {args.model}, mode {mode.value}, nats {nats_url})", flush=True)
        while not signals.stop_requested:
            supervisor.poll()
            time.sleep(SUPERVISE_POLL_S)
    except (StackError, StartupError, RuntimeError, OSError) as exc:  # also a child that never started, an interrupt
        print(f"pdserve up: {exc}", file=sys.stderr)
        exit_code = 1
    finally:
        if state_file is not None:
            state_file.unlink(missing_ok=True)
        supervisor.stop(args.drain_timeout, forced=lambda: signals.forced)
        if nats is not None:
            nats.stop()
        auth.close()
        if logs is not None and exit_code == 0:
            shutil.rmtree(logs.run_dir, ignore_errors=True)  # kept only when something failed, for its logs
    return exit_code


class _Signals:
    """SIGINT/SIGTERM: the first asks for an ordered stop, the second forces it."""

    def __init__(self):
        self.count = 0
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        for _ in range(early_interrupt.received()):  # Ctrl-C while `pdserve` was still starting
            self._on_signal()

    def _on_signal(self, *_) -> None:
        self.count += 1
        if self.count == 1:
            print("pdserve up: stopping (gateway drains first; interrupt again to kill everything now)", file=sys.stderr, flush=True)

    @property
    def stop_requested(self) -> bool:
        return self.count >= 1

    @property
    def forced(self) -> bool:
        return self.count >= 2


def _service_children(
    args: argparse.Namespace, mode: Mode, nats_url: str, workers: list[WorkerPlan], auth: StackAuth, logs: ServiceLogs
) -> list[Child]:
    """Scheduler, workers, gateway: in start order, each with its role's secrets in its environment."""
    from shared.layouts import parse_layout

    ranks = sum(parse_layout(w.layout, "prefill" if w.role == "prefill" else "decode").world for w in workers)
    threads = args.threads or max(1, (os.cpu_count() or 1) // ranks)  # every rank is a process sharing the cores
    base = [sys.executable, "-m", "services.cli"]
    common = ["--nats", nats_url, "--prefix", args.prefix, "--log-level", args.log_level, "--drain-timeout", str(args.drain_timeout)]
    common += auth.nats.tls_flags()
    children = [_child("scheduler", "scheduler", Stage.SCHEDULER, base + ["scheduler", *common, "--mode", mode.value], auth, logs)]
    for worker in workers:
        command = (
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
        children.append(_child(f"worker {worker.worker_id}", worker.worker_id, Stage.WORKERS, command, auth, logs))
    gateway = (
        base
        + ["gateway", *common, "--model", args.model, "--host", args.host, "--port", str(args.port)]
        + ["--max-concurrent-requests", str(args.max_concurrent_requests), "--migration-limit", str(args.migration_limit)]
        + ["--generation-config", args.generation_config]
    )
    children.append(_child("gateway", "gateway", Stage.GATEWAY, gateway, auth, logs))
    return children


def _child(name: str, log_name: str, stage: Stage, command: list[str], auth: StackAuth, logs: ServiceLogs) -> Child:
    """A supervised child whose output goes to `<run dir>/<log_name>.log`; the subcommand is its NATS role."""
    env = auth.child_env(NatsRole(command[3]))

    def launch() -> subprocess.Popen:  # again on every restart: same command, same secrets, same log file
        return logs.spawn(log_name, command, env=env)

    def last_lines() -> str:
        service = next((s for s in reversed(logs.services) if s.name == log_name), None)
        if service is None:
            return "    (nothing logged)"
        return f"    ({service.path})\n{service.last_lines()}"

    return Child(name, stage, launch, last_lines)
