"""`pdserve prefill | decode | worker --role ...`."""

from __future__ import annotations

import argparse
import asyncio
import uuid

import torch

from services.worker.handoff import parse_worker_layout
from services.worker.service import WorkerService
from shared.engine import load_progress
from shared.engine.collectives import build_collectives
from shared.engine.dtypes import default_dtype, parse_dtype
from shared.engine.engine import Engine, SchedulingConfig
from shared.engine.loader import load_model
from shared.engine.shard import ModelShard
from shared.engine.step_work import Stop
from shared.log import configure_logging
from shared.nats_auth import connect_options_for
from shared.nats_permissions import NatsRole
from shared.protocol import RankAddress, Role
from shared.shutdown import wait_for_either
from shared.ranks.channel import LeaderChannel
from shared.ranks.follower import Follower
from shared.ranks.leader_group import LeaderGroup
from shared.ranks.process_group import RankGroupError, leave
from shared.ranks.reports import ReportBoard, describe_rank, publish_info, read_infos
from shared.ranks.setup import RankSetup
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
    try:
        layout = parse_worker_layout(role, args.layout)
    except ValueError as exc:
        raise SystemExit(f"pdserve {args.command}: --layout: {exc}") from None
    try:
        ucx_host = resolve_ucx_host(args.ucx_host)  # an address, an interface or auto (ucx_host.py)
    except UcxHostError as exc:
        raise SystemExit(f"pdserve {args.command}: {exc}") from None
    keep_ucx_on(ucx_host)
    args.ucx_host = ucx_host.address  # what every rank listens on and advertises
    group = RankSetup.for_layout(layout, args)
    # One thread per rank by default when a layout runs several ranks on one host: they share its cores.
    torch.set_num_threads(args.threads or (1 if layout.world > 1 else torch.get_num_threads()))
    # Until the service is up (loading, connecting) a signal ends the process at once: nothing to drain yet.
    # Other ranks always die on SIGTERM; their leader stops them.
    stop = asyncio.Event() if group.rank == 0 else None
    try:
        store = await group.join(args.dist_timeout)
        if group.rank == 0:  # the leader: NATS, scheduling, and its own shard
            return await _lead(args, role, worker_id, layout, group, store, stop, log)
        return await _follow(args, role, layout, group, store, log)
    except RankGroupError as exc:
        log.error("rank_group_failed", error=str(exc))
        raise SystemExit(f"pdserve {args.command} (worker {worker_id}, rank {group.rank}): {exc}") from None
    finally:
        group.stop_followers()
        leave()


async def _build_rank(args, role: Role, layout, rank: int) -> tuple[Engine, RankTransfer, str]:
    """This rank's shard of the model, its engine (cache, runner) and its own UCX endpoint."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = parse_dtype(args.dtype, device) if args.dtype else default_dtype(device)
    shard = ModelShard.of(layout, rank)
    comm = build_collectives(shard)  # every rank creates the same process groups, in the same order
    loaded = await asyncio.to_thread(load_model, args.model, dtype, shard=shard, comm=comm)
    kv_dtype = parse_dtype(args.kv_dtype, device) if args.kv_dtype else None
    scheduling = SchedulingConfig(
        max_num_batched_tokens=args.max_num_batched_tokens or DEFAULT_STEP_TOKENS[role],
        max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting,  # the worker refuses first (429), so the engine's queue never overflows
    )
    load_progress.report("preparing the engine (KV cache, kernels)")
    engine = Engine(loaded, kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size, kv_dtype=kv_dtype, scheduling=scheduling)
    transport = UcxKvTransport(KvSender(), KvReceiver(args.ucx_host))
    await transport.receiver.start()
    return engine, RankTransfer(rank, transport, cache=engine.kv_cache.hnd_views), device


async def _follow(args, role: Role, layout, group: RankSetup, store, log) -> int:
    engine, transfer, device = await _build_rank(args, role, layout, group.rank)
    publish_info(store, describe_rank(group.rank, device, *transfer.transport.address()))
    log.info("rank_following", rank=group.rank, world=layout.world)
    try:
        reason = await Follower(engine, transfer, store).run()
    except Exception as exc:  # the leader or another rank is gone
        raise RankGroupError(f"rank {group.rank} lost its group: {exc}") from None
    finally:
        await transfer.transport.close()
    log.info("rank_stopped", rank=group.rank, reason=reason)
    return 0


async def _lead(args, role: Role, worker_id: str, layout, group: RankSetup, store, stop: asyncio.Event, log) -> int:
    nc = await connect_nats(args.nats, f"pd-{worker_id}", options=connect_options_for(args, NatsRole.WORKER))
    engine, transfer, device = await _build_rank(args, role, layout, 0)
    engine.kv_holder = transfer.hold
    exit_code = 0
    if layout.world > 1:
        channel = LeaderChannel(engine.runner.comm)
        engine.channel = channel
        publish_info(store, describe_rank(0, device, *transfer.transport.address()))
        ranks = await asyncio.to_thread(read_infos, store, layout.world)
        addresses = [RankAddress(info.rank, info.ucx_host, info.ucx_port) for info in ranks]
        board = ReportBoard(store, asyncio.get_running_loop())
        sessions_group = LeaderGroup(transfer, addresses, None, channel.broadcast, board, report_timeout_s=args.kv_lease)
    else:
        ranks = [describe_rank(0, device, *transfer.transport.address())]
        sessions_group = InProcessGroup([transfer])

    def group_failed(reason: str) -> None:
        nonlocal exit_code
        exit_code = 1
        stop.set()

    service = WorkerService(
        nc,
        Subjects(args.prefix),
        worker_id,
        role,
        engine.loaded,
        engine,
        sessions_group,
        warm_up=transfer.transport.sender.connect,
        layout=layout,
        max_waiting=args.max_waiting,
        metrics_port=args.metrics_port,
        kv_lease_s=args.kv_lease,
        on_drained=stop.set,
        on_group_failure=group_failed,
        ranks=ranks,
    )
    if isinstance(sessions_group, LeaderGroup):
        sessions_group.bind(lambda work: service.ctx.engine_loop.call(engine.channel.broadcast, work))
    await service.start()
    watcher = asyncio.create_task(group.watch(lambda rank, how: asyncio.ensure_future(service.group_failed(how))))
    signalled = stop_event_on_signals()
    await wait_for_either(signalled, stop)  # SIGTERM, or an admin drain that finished, or the group failed
    if not stop.is_set():  # SIGTERM: the admin drain's behaviour, bounded; what is left ends as unavailable
        await service.drain_now(args.drain_timeout)
    watcher.cancel()
    log.info("worker_stopping", exit_code=exit_code)
    try:
        await asyncio.wait_for(service.stop(), STOP_TIMEOUT_S)
    except TimeoutError:
        log.warning("worker_stop_timed_out")
    if layout.world > 1 and service.group_failure is None:
        await asyncio.to_thread(_tell_ranks_to_stop, engine)
    await transfer.transport.close()
    await close_nats(nc)
    if exit_code:
        raise RankGroupError(f"stopped serving: {service.group_failure}")
    return 0


def _tell_ranks_to_stop(engine: Engine) -> None:
    try:
        engine.channel.broadcast(Stop("leader stopping"))
    except Exception:  # a broken group: the launcher stops what is left
        pass
