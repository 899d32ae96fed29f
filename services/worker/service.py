"""A worker process: engine + NATS control + UCX data, for role prefill, decode or both.

Every request on the worker is one entry of its request table (services/worker/requests.py);
every end goes through `release`. Admin endpoints: `status`, `requests` (the table),
`drain` (stop taking work, finish what is in flight, exit), `cancel`, `loglevel`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as NatsClient

from services.decode.handler import DecodeHandler
from services.prefill.handler import PrefillHandler
from services.scheduler.registry import HEARTBEAT_INTERVAL_S, LOAD_BEAT_GAP_S
from services.worker.context import WorkerContext, finish_reason, token_logprobs
from services.worker.engine_loop import EngineLoop
from services.worker.handoff import kv_spec_of, parse_worker_layout
from services.worker.metrics import WorkerMetrics
from services.worker.requests import CANCELLED, DONE, Ending, Phase, RequestTable, WorkerRequest
from services.worker.streams import TokenStreams
from shared import protocol
from shared.admin import AdminError, start_admin
from shared.engine.engine import Engine, TokenOutput
from shared.engine.loader import LoadedModel
from shared.layouts import Layout
from shared.protocol import CancelRequest, ErrorCode, Heartbeat, Role
from shared.session import KvSessionEngine, RankGroup
from shared.subjects import Subjects

log = structlog.get_logger()

_cancel_decoder = protocol.decoder(CancelRequest)
PROBE_TIMEOUT_S = 3.0  # admin status waits this long for the other ranks' answers
KV_SAMPLE_MAX_TOKENS = 64  # admin `kv` returns values: keep them small
_heartbeat_decoder = protocol.decoder(Heartbeat)


class WorkerService:
    def __init__(
        self,
        nc: NatsClient,
        subjects: Subjects,
        worker_id: str,
        role: Role,
        model: LoadedModel,
        engine: Engine,
        group: RankGroup,
        warm_up: Callable[[str, int], object],
        layout: Layout | None = None,
        max_waiting: int = 64,
        metrics_port: int = 0,
        kv_lease_s: float = 10.0,
        on_drained: Callable[[], None] = lambda: None,
        on_group_failure: Callable[[str], None] = lambda reason: None,
        ranks: list | None = None,
    ):
        self.metrics_port = metrics_port
        self.group = group
        self._load_dropped = asyncio.Event()  # a request left the table: beat soon (`_beat_forever`)
        self._warm_up = warm_up  # opens a UCX endpoint to a decoder ahead of its first hand-off
        layout = layout if layout is not None else parse_worker_layout(role, "")
        # Strict dtypes: a hand-off between workers of different KV dtypes is refused by name
        # (the re-shard kernels can cast, but silently changing precision is the operator's call).
        sessions = KvSessionEngine(kv_spec_of(model, engine), layout, group, lease_s=kv_lease_s, allow_dtype_cast=False)
        self.ctx = WorkerContext(
            nc=nc,
            subjects=subjects,
            worker_id=worker_id,
            role=role,
            model=model,
            engine_loop=EngineLoop(engine, self._on_tokens, self._on_step_failure, self._on_step),
            streams=TokenStreams(nc, worker_id),
            metrics=WorkerMetrics(worker_id, role.label),
            max_waiting=max_waiting,
            layout=layout,
            sessions=sessions,
            requests=RequestTable(self._cleanup),
        )
        # Every role takes prefill jobs: a decode worker prefills for itself when the
        # scheduler decides a hand-off does not pay (auto mode).
        self.prefill = PrefillHandler(self.ctx, self.release)
        self.decode = DecodeHandler(self.ctx, self.release)
        self._on_drained = on_drained
        self._on_group_failure = on_group_failure
        self.ranks = ranks or []  # RankInfo of every rank (admin status)
        self.group_failure: str | None = None
        self._subscriptions = []
        self._tasks: list[asyncio.Task] = []
        self._admin = None
        self._warmed: set[tuple[str, int]] = set()
        self.incarnation = uuid.uuid4().hex[:12]  # this run of the process: a restart under the same id is another

    @property
    def engine(self) -> Engine:
        return self.ctx.engine_loop.engine

    async def start(self) -> None:
        ctx = self.ctx
        ctx.engine_loop.start()
        subjects = ctx.subjects
        self._subscriptions.append(await ctx.nc.subscribe(subjects.worker_prefill(ctx.worker_id), cb=self.prefill.on_job))
        if ctx.role in (Role.DECODE, Role.BOTH):
            self._subscriptions.append(await ctx.nc.subscribe(subjects.worker_decode(ctx.worker_id), cb=self.decode.on_job))
        self._subscriptions.append(await ctx.nc.subscribe(subjects.worker_cancel(ctx.worker_id), cb=self._on_cancel))
        if ctx.role in (Role.PREFILL, Role.BOTH):
            self._subscriptions.append(await ctx.nc.subscribe(subjects.all_heartbeats, cb=self._warm_up_decoder))
        self._admin = await start_admin(
            ctx.nc,
            subjects,
            "worker",
            ctx.worker_id,
            {"status": self._status, "requests": self._requests, "kv": self._kv, "drain": self._drain, "cancel": self._admin_cancel},
        )
        if self.metrics_port:
            ctx.metrics.serve(self.metrics_port)
        await self._beat()  # be placeable at once, not one interval later
        self._tasks.append(asyncio.create_task(self._beat_forever(), name="heartbeat"))
        log.info("worker_started", worker_id=ctx.worker_id, role=ctx.role.label, model=ctx.model.name, ranks=self.group.world)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._admin is not None:
            await self._admin.stop()
        for sub in self._subscriptions:
            await sub.unsubscribe()
        await self.ctx.engine_loop.stop()

    # -- the one release path ----------------------------------------------------------------

    async def release(self, request_id: str, ending: Ending) -> bool:
        return await self.ctx.requests.release(request_id, ending)

    async def _cleanup(self, request: WorkerRequest, ending: Ending) -> None:
        """Gives back what a released request held: KV on every rank, engine pages, and tells the client."""
        ctx = self.ctx
        self.prefill.forget(request.request_id)
        if self.group_failure is None:  # a broken group takes everything with it
            ctx.sessions.cancel(request.request_id)
            await ctx.engine_loop.call(self.engine.abort, request.request_id)
        if ending.reason is not None:
            await ctx.streams.publish_end(request.stream_subject, request.request_id, ending)
        self._load_dropped.set()
        log.debug("released", request_id=request.request_id, ending=ending.reason.label if ending.reason else "done")

    # -- engine outputs ----------------------------------------------------------------------

    async def _on_tokens(self, outputs: list[TokenOutput]) -> None:
        metrics = self.ctx.metrics
        metrics.labels(metrics.generated_tokens).inc(len(outputs))
        for out in outputs:
            request = self.ctx.requests.get(out.request_id)
            if request is None:  # released while its step ran: whatever it still holds goes
                self.ctx.sessions.cancel(out.request_id)
                await self.ctx.engine_loop.call(self.engine.free, out.request_id)
                continue
            if request.phase in (Phase.QUEUED, Phase.PREFILLING):
                await self.prefill.on_first_token(request, out)
                continue
            reason = finish_reason(out.finish_reason)
            await self.ctx.streams.publish(request, [out.token_id], reason, token_logprobs(out))
            if reason is not None:
                await self.release(out.request_id, DONE)

    async def _on_step_failure(self, request_ids: list[str], error: str) -> None:
        if self.group.world > 1:  # the ranks no longer agree on what ran: the group cannot go on
            await self.group_failed(error)
            return
        for request_id in request_ids:  # the engine already released their pages
            await self.release(request_id, Ending.failed(error))

    async def group_failed(self, reason: str) -> None:
        """A rank died or a collective failed: stop being placeable, end every request (their gateways
        retry them elsewhere), and have the process exit so the whole group restarts."""
        if self.group_failure is not None:
            return
        self.group_failure = reason
        log.error("rank_group_failed", reason=reason, requests=len(self.ctx.requests))
        self.ctx.draining = True
        for task in self._tasks:
            if task.get_name() == "heartbeat":
                task.cancel()  # the scheduler forgets this worker within its TTL
        error = f"worker {self.ctx.worker_id} failed: {reason}"
        for request in self.ctx.requests:
            await self.release(request.request_id, Ending.failed(error, ErrorCode.UNAVAILABLE))
        self._on_group_failure(reason)

    def _on_step(self, prompt_tokens: int, seconds: float) -> None:
        ctx = self.ctx
        for request_id in self.engine.last_step_started:
            ctx.requests.move(request_id, Phase.PREFILLING)
        metrics = ctx.metrics
        metrics.labels(metrics.step_seconds).observe(seconds)
        if prompt_tokens:
            ctx.rates.observe_prefill(prompt_tokens, seconds)
            metrics.labels(metrics.prefill_tokens).inc(prompt_tokens)
            metrics.labels(metrics.step_prompt_tokens).observe(prompt_tokens)

    # -- cancellation ------------------------------------------------------------------------

    async def cancel(self, request_id: str) -> bool:
        """Stops the request wherever it is on this worker; True if it held it."""
        self.ctx.cancelled.add(request_id)  # its job may still be on its way here
        held = await self.release(request_id, CANCELLED)
        log.info("cancelled", request_id=request_id, held=held)
        return held

    async def _on_cancel(self, msg) -> None:
        try:
            request_id = _cancel_decoder.decode(msg.data).request_id
        except msgspec.DecodeError:
            log.warning("malformed_cancel")
            return
        await self.cancel(request_id)

    async def _admin_cancel(self, body: dict) -> dict:
        request_id = body.get("request_id")
        if not isinstance(request_id, str):
            raise AdminError(400, '"request_id" (a string) is required')
        return {"request_id": request_id, "held": await self.cancel(request_id)}

    # -- hand-off warm-up --------------------------------------------------------------------

    async def _warm_up_decoder(self, msg) -> None:
        """Connects to each decoder once when it first appears, so no request pays for it."""
        try:
            beat = _heartbeat_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        peer = (beat.ucx_host, beat.ucx_port)
        if beat.role is Role.PREFILL or beat.worker_id == self.ctx.worker_id or peer in self._warmed:
            return
        self._warmed.add(peer)
        task = asyncio.create_task(self._connect_quietly(*peer))
        self._tasks.append(task)

    async def _connect_quietly(self, host: str, port: int) -> None:
        try:
            await self._warm_up(host, port)
        except Exception as exc:  # the hand-off itself will retry and report
            self._warmed.discard((host, port))
            log.warning("ucx_warm_up_failed", peer=f"{host}:{port}", error=repr(exc))

    # -- admin -------------------------------------------------------------------------------

    async def _status(self, _: dict) -> dict:
        beat = self.heartbeat()
        return {
            "instance": beat.worker_id,
            "kind": "worker",
            "role": beat.role.label,
            "model": beat.model,
            "layout": beat.layout,
            "running": beat.running,
            "waiting": beat.waiting,
            "requests": len(self.ctx.requests),
            "sessions_in_flight": self.ctx.requests.count(Phase.HANDING_OFF, Phase.AWAITING_KV),
            "kv_blocks_used": beat.total_kv_blocks - beat.free_kv_blocks,
            "kv_blocks_total": beat.total_kv_blocks,
            "draining": beat.draining,
            "ended": dict(self.ctx.requests.ended),
            "metrics_port": self.metrics_port,
            "ranks": await self._rank_rows(),
            **self._token_totals(),
        }

    async def _rank_rows(self) -> list[dict]:
        """Every rank of this worker: where it runs, the KV pages of its DP group in use, what it holds
        (block tables, sessions) and what it moved over UCX; the other ranks answer a probe."""
        probe = getattr(self.group, "probe", None)
        reports = await probe(PROBE_TIMEOUT_S) if probe is not None else {}
        local = self._leader_transfer
        rows = []
        for info in self.ranks:
            row = {
                "rank": info.rank, "pid": info.pid, "host": info.host, "device": info.device,
                "ucx": f"{info.ucx_host}:{info.ucx_port}", "dp_group": self.ctx.layout.coord(info.rank).dp,
                "kv_blocks_used": self._kv_blocks_used(info.rank),
            }
            if info.rank == 0:
                row |= {"ucx_bytes_sent": local.bytes_sent, "ucx_bytes_received": local.bytes_received,
                        "block_tables": len(self.engine.runner.tables), "kv_sessions": local.num_sessions}
            elif info.rank in reports:
                report = reports[info.rank]
                row |= {"ucx_bytes_sent": report.bytes_sent, "ucx_bytes_received": report.bytes_received,
                        "block_tables": report.tables, "kv_sessions": report.sessions}
            else:
                row["error"] = "no answer to the probe"
            rows.append(row)
        return rows

    def _token_totals(self) -> dict:
        """Counters `pdserve admin status --watch` turns into rates."""
        registry = self.ctx.metrics.registry
        labels = {"worker_id": self.ctx.worker_id, "role": self.ctx.role.label}
        generated = registry.get_sample_value("pdserve_worker_generated_tokens_total", labels) or 0
        prompt = registry.get_sample_value("pdserve_worker_prefill_tokens_total", labels) or 0
        return {"generated_tokens_total": int(generated), "prompt_tokens_total": int(prompt)}

    async def _requests(self, _: dict) -> dict:
        """The request table: what each in-flight request is doing here and what it holds."""
        rows = []
        for request in self.ctx.requests:
            seq = self.engine.sequence(request.request_id)
            rows.append({
                "request_id": request.request_id,
                "phase": request.phase.label,
                "path": request.path.label,
                "prompt_tokens": request.num_prompt_tokens,
                "generated_tokens": request.num_generated,
                "age_s": round(request.age_s, 3),
                "kv_blocks": len(seq.block_table) if seq is not None else 0,
                "ranks": self._ranks_holding(request.request_id),
            })
        return {"instance": self.ctx.worker_id, "ranks": self.group.world, "requests": rows}

    async def _kv(self, body: dict) -> dict:
        """A sample of a request's KV as each rank's cache holds it: the first `tokens` positions, every one of the
        rank's layers and heads (debugging a hand-off: which rank holds what, and is it right)."""
        request_id, tokens = body.get("request_id"), body.get("tokens", 4)
        if not isinstance(request_id, str) or not isinstance(tokens, int) or not 0 < tokens <= KV_SAMPLE_MAX_TOKENS:
            raise AdminError(400, f'"request_id" (a string) and "tokens" (1..{KV_SAMPLE_MAX_TOKENS}) are required')
        seq, group = self.engine.sequence(request_id), self.engine.dp_group_of(request_id)
        if seq is None or seq.num_cached < tokens:
            raise AdminError(404, f"{request_id!r} holds no KV of {tokens} tokens on {self.ctx.worker_id}")
        table = list(seq.block_table)
        rows = {}
        if group == 0:  # the leader, rank 0, is in DP group 0
            own = await self.ctx.engine_loop.call(self.engine.runner.export, table, tokens)
            rows[0] = {"shape": list(own.shape), "values": own.float().flatten().tolist()}
        sample = getattr(self.group, "sample_kv", None)
        if sample is not None:
            for rank, report in (await sample(table, tokens, group, PROBE_TIMEOUT_S)).items():
                if report.shape:
                    rows[rank] = {"shape": report.shape, "values": report.values}
        ranks = [{"rank": info.rank, "holds": info.rank in rows, **rows.get(info.rank, {})} for info in self.ranks]
        return {"instance": self.ctx.worker_id, "request_id": request_id, "dp_group": group, "ranks": ranks}

    def _ranks_holding(self, request_id: str) -> list[int]:
        """The ranks whose caches hold (or will hold) the request's KV: its DP group's."""
        group = self.engine.dp_group_of(request_id)
        return self.ctx.layout.group_ranks(group if group is not None else 0)

    async def _drain(self, _: dict) -> dict:
        if not self.ctx.draining:
            self.ctx.draining = True
            await self._beat()  # leave placement now, not at the next beat
            self._tasks.append(asyncio.create_task(self._finish_then_exit(), name="drain"))
            log.info("draining", requests=len(self.ctx.requests))
        return {"instance": self.ctx.worker_id, "draining": True, "requests": len(self.ctx.requests)}

    async def drain_now(self, timeout: float) -> None:
        """Stops taking work, waits up to `timeout` for in-flight requests, ends the rest with an error event."""
        self.ctx.draining = True
        await self._beat()
        deadline = time.monotonic() + timeout
        while len(self.ctx.requests) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for request in self.ctx.requests:
            await self.release(request.request_id, Ending.failed(f"worker {self.ctx.worker_id} shut down", ErrorCode.UNAVAILABLE))

    async def _finish_then_exit(self) -> None:
        while len(self.ctx.requests):
            await asyncio.sleep(0.1)
        log.info("drained", ended=dict(self.ctx.requests.ended))
        self._on_drained()

    # -- heartbeats --------------------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        ctx = self.ctx
        engine = self.engine
        requests = ctx.requests
        metrics = ctx.metrics
        metrics.labels(metrics.kv_usage).set(1 - engine.num_free_blocks / engine.num_blocks)
        metrics.labels(metrics.running).set(requests.running)
        metrics.labels(metrics.waiting).set(requests.waiting)
        self._rank_metrics()
        leader = self.group.addresses()[0]  # the address prefill workers warm up a connection to
        return Heartbeat(
            worker_id=ctx.worker_id,
            role=ctx.role,
            model=ctx.model.name,
            model_fingerprint=ctx.model.config.fingerprint(),
            ucx_host=leader.host,
            ucx_port=leader.port,
            running=requests.running,
            waiting=requests.waiting,
            free_kv_blocks=engine.num_free_blocks,
            total_kv_blocks=engine.num_blocks,
            queued_prefill_tokens=requests.queued_prefill_tokens,
            sent_at=time.time(),
            kv_bytes_per_token=engine.kv_bytes_per_token,
            draining=ctx.draining,
            prefill_tokens_per_s=ctx.rates.prefill_tokens_per_s,
            handoff_bytes_per_s=ctx.rates.handoff_bytes_per_s,
            metrics_port=self.metrics_port,
            layout=ctx.layout.describe(),
            dp_load=engine.dp_loads() if engine.dp > 1 else [],
            incarnation=self.incarnation,
        )

    def _rank_metrics(self) -> None:
        """Per-rank gauges from what the ranks last reported (rank 0's own counters are live)."""
        metrics = self.ctx.metrics
        board = getattr(self.group, "board", None)
        local = self._leader_transfer
        for info in self.ranks:
            if info.rank == 0:
                sent, received = local.bytes_sent, local.bytes_received
            else:
                sent, received = board.totals.get(info.rank, (0, 0)) if board is not None else (0, 0)
            rank = str(info.rank)
            metrics.labels(metrics.rank_ucx_bytes, rank=rank, direction="sent").set(sent)
            metrics.labels(metrics.rank_ucx_bytes, rank=rank, direction="received").set(received)
            metrics.labels(metrics.rank_kv_blocks_used, rank=rank).set(self._kv_blocks_used(info.rank))

    @property
    def _leader_transfer(self):
        """Rank 0's own `RankTransfer` (a process group's leader, or an in-process group's first rank)."""
        return getattr(self.group, "local", None) or self.group.ranks[0]

    def _kv_blocks_used(self, rank: int) -> int:
        """KV blocks in use in the cache of `rank`'s DP group (every rank of a group holds the same pages)."""
        allocator = self.engine.schedulers[self.ctx.layout.coord(rank).dp].allocator
        return allocator.num_blocks - allocator.num_free

    async def _beat(self) -> None:
        ctx = self.ctx
        await ctx.nc.publish(ctx.subjects.heartbeat(ctx.role.label, ctx.worker_id), protocol.encode(self.heartbeat()))

    async def _beat_forever(self) -> None:
        """Beats every HEARTBEAT_INTERVAL_S, and LOAD_BEAT_GAP_S after a request leaves.

        Between beats the scheduler adds its own placements to a worker's load but cannot see
        what finished, so the worker that beat last looks lightest and takes request after
        request until it looks as busy as the rest (herding: measured in docs/planner.md).
        Beating soon after requests end keeps every worker's load fresh; the gap gathers the
        ends of a burst into one beat, so a worker sends at most ~1/LOAD_BEAT_GAP_S beats a second.
        """
        while True:
            try:
                await asyncio.wait_for(self._load_dropped.wait(), HEARTBEAT_INTERVAL_S)
                await asyncio.sleep(LOAD_BEAT_GAP_S)
            except TimeoutError:
                pass
            self._load_dropped.clear()
            try:
                await self._beat()
            except Exception as exc:  # a NATS reconnect must not end the heartbeat
                log.warning("heartbeat_failed", error=repr(exc))
