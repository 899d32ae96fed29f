"""`pdserve prefill | decode | worker --role ...`."""

from __future__ import annotations

import argparse
import asyncio
import uuid

import torch

from services.worker.handoff import parse_worker_layout
from services.worker.service import WorkerService
from shared.engine.dtypes import default_dtype, parse_dtype
from shared.engine.engine import Engine, SchedulingConfig
from shared.engine import load_progress
from shared.engine.loader import load_model
from shared.log import configure_logging
from shared.nats_auth import connect_options_for
from shared.nats_permissions import NatsRole
from shared.protocol import Role
from shared.runtime import close_nats, connect_nats, stop_event_on_signals
from shared.session import InProcessGroup, RankTransfer, UcxKvTransport
from shared.subjects import Subjects
from shared.transport.ucx_host import UcxHostError, keep_ucx_on, resolve_ucx_host
from shared.transport.ucx_kv import KvReceiver, KvSender

STOP_TIMEOUT_S = 15.0

# Tokens per engine step, by role, unless --max-num-batched-tokens says otherwise. A
# prefill worker wants big batches (one pass takes a long prompt whole); a worker that
# decodes keeps steps short, so a long prompt runs in chunks between decode steps instead
# of stalling every stream beside it.
DEFAULT_STEP_TOKENS = {Role.PREFILL: 2048, Role.DECODE: 512, Role.BOTH: 512}


async def run(args: argparse.Namespace) -> int:
    role = Role[args.role.upper()]
    worker_id = args.worker_id or f"{role.label}-{uuid.uuid4().hex[:8]}"
    log = configure_logging(f"{role.label}-worker", args.log_level).bind(worker_id=worker_id)
    if args.threads:
        torch.set_num_threads(args.threads)
    stop = stop_event_on_signals()
    try:
        layout = parse_worker_layout(role, args.layout)
    except ValueError as exc:
        raise SystemExit(f"pdserve {args.command}: --layout: {exc}") from None
    try:
        ucx_host = resolve_ucx_host(args.ucx_host)  # an address, an interface or auto (ucx_host.py)
    except UcxHostError as exc:
        raise SystemExit(f"pdserve {args.command}: {exc}") from None
    keep_ucx_on(ucx_host)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = parse_dtype(args.dtype, device) if args.dtype else default_dtype(device)
    loaded = load_model(args.model, dtype=dtype, ep=layout.ep)
    kv_dtype = parse_dtype(args.kv_dtype, device) if args.kv_dtype else None
    scheduling = SchedulingConfig(
        max_num_batched_tokens=args.max_num_batched_tokens or DEFAULT_STEP_TOKENS[role],
        max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting,  # the worker refuses first (429), so the engine's queue never overflows
    )
    load_progress.report("preparing the engine (KV cache, kernels)")
    engine = Engine(loaded, kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size, kv_dtype=kv_dtype, scheduling=scheduling)
    transport = UcxKvTransport(KvSender(), KvReceiver(ucx_host.address))
    await transport.receiver.start()
    rank = RankTransfer(0, transport, cache=engine.kv_cache.hnd_views)
    engine.kv_holder = rank.hold
    nc = await connect_nats(args.nats, f"pd-{worker_id}", options=connect_options_for(args, NatsRole.WORKER))
    service = WorkerService(
        nc,
        Subjects(args.prefix),
        worker_id,
        role,
        loaded,
        engine,
        InProcessGroup([rank]),
        warm_up=transport.sender.connect,
        layout=layout,
        max_waiting=args.max_waiting,
        metrics_port=args.metrics_port,
        kv_lease_s=args.kv_lease,
        on_drained=stop.set,
    )
    await service.start()
    await stop.wait()
    log.info("worker_stopping")
    try:
        await asyncio.wait_for(service.stop(), STOP_TIMEOUT_S)
    except TimeoutError:
        log.warning("worker_stop_timed_out")
    await transport.close()
    await close_nats(nc)
    return 0
