"""`pdserve prefill | decode | worker --role ...`."""

from __future__ import annotations

import argparse
import asyncio
import socket
import uuid

import torch

from services.worker.handoff import parse_worker_layout
from services.worker.service import WorkerService
from services.worker.shutdown import drain_on_signal, wait_for_either
from shared.engine.dtypes import default_dtype, parse_dtype
from shared.engine.engine import Engine, SchedulingConfig
from shared.engine.loader import load_model
from shared.log import configure_logging
from shared.protocol import Role
from shared.runtime import close_nats, connect_nats, stop_event_on_signals
from shared.shutdown import bounded
from shared.subjects import Subjects

STOP_TIMEOUT_S = 15.0

# Tokens per engine step, by role, unless --max-num-batched-tokens says otherwise. A
# prefill worker wants big batches (one pass takes a long prompt whole); a worker that
# decodes keeps steps short, so a long prompt runs in chunks between decode steps instead
# of stalling every stream beside it.
DEFAULT_STEP_TOKENS = {Role.PREFILL: 2048, Role.DECODE: 512, Role.BOTH: 512}


def resolve_ucx_host(value: str) -> str:
    """`auto`: this host's address as its peers see it (a container's own IP under compose)."""
    return socket.gethostbyname(socket.gethostname()) if value == "auto" else value


async def run(args: argparse.Namespace) -> int:
    role = Role[args.role.upper()]
    worker_id = args.worker_id or f"{role.label}-{uuid.uuid4().hex[:8]}"
    log = configure_logging(f"{role.label}-worker", args.log_level).bind(worker_id=worker_id)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        layout = parse_worker_layout(role, args.layout)
    except ValueError as exc:
        raise SystemExit(f"pdserve {args.command}: --layout: {exc}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = parse_dtype(args.dtype, device) if args.dtype else default_dtype(device)
    loaded = load_model(args.model, dtype=dtype, ep=layout.ep)
    kv_dtype = parse_dtype(args.kv_dtype, device) if args.kv_dtype else None
    scheduling = SchedulingConfig(
        max_num_batched_tokens=args.max_num_batched_tokens or DEFAULT_STEP_TOKENS[role],
        max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting,  # the worker refuses first (429), so the engine's queue never overflows
    )
    engine = Engine(loaded, kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size, kv_dtype=kv_dtype, scheduling=scheduling)
    nc = await connect_nats(args.nats, f"pd-{worker_id}")
    drained = asyncio.Event()
    service = WorkerService(
        nc,
        Subjects(args.prefix),
        worker_id,
        role,
        loaded,
        engine,
        layout=layout,
        ucx_host=resolve_ucx_host(args.ucx_host),
        max_waiting=args.max_waiting,
        metrics_port=args.metrics_port,
        on_drained=drained.set,
    )
    await service.start()
    # Until here (loading, connecting) a signal ends the process at once: nothing to drain yet.
    signalled = stop_event_on_signals()
    await wait_for_either(signalled, drained)  # SIGTERM, or an admin drain that finished
    if not drained.is_set():
        await drain_on_signal(service, drained, args.drain_timeout)
    log.info("worker_stopping")
    await bounded(service.stop(), "worker stop", STOP_TIMEOUT_S)
    await close_nats(nc)
    return 0
