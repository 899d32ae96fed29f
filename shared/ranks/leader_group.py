"""The leader's view of its rank group for KV hand-offs (a `shared.session.group.RankGroup`).

Rank 0 moves its own segments itself (its `RankTransfer`); every other rank is told through
the step channel — `submit` runs the broadcast on the engine thread, so a move is ordered
with the steps around it — and answers through the report board. A move is done when every
rank with a part in it has reported; a rank that fails or does not answer in time fails it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence

import structlog

from shared.engine.step_work import (
    Drop,
    Peer,
    PlanKey,
    Prepare,
    Probe,
    Receive,
    SampleKv,
    Scatter,
    Send,
    Work,
)
from shared.protocol import KvSegment, RankAddress, TransferStats
from shared.ranks.reports import RankReport, ReportBoard
from shared.session.errors import KvTransferError
from shared.session.group import combined
from shared.session.rank_transfer import RankTransfer
from shared.session.wire import layout_to_wire, spec_to_wire
from shared.transfer_plan import TransferPlan

log = structlog.get_logger()

Submit = Callable[[Work], Awaitable[None]]


def plan_key(plan: TransferPlan) -> PlanKey:
    return PlanKey(
        layout_to_wire(plan.src_layout), layout_to_wire(plan.dst_layout), spec_to_wire(plan.src_spec),
        spec_to_wire(plan.dst_spec), plan.dst_dp_group,
    )


class LeaderGroup:
    def __init__(
        self,
        local: RankTransfer,
        addresses: Sequence[RankAddress],
        submit: Submit | None,
        broadcast: Callable[[Work], None],
        board: ReportBoard,
        report_timeout_s: float,
    ):
        self.local = local
        self._addresses = list(addresses)
        self._submit = submit  # from the event loop: broadcast on the engine thread
        self._broadcast = broadcast  # already on the engine thread
        self.board = board
        self.report_timeout_s = report_timeout_s
        self._background: set[asyncio.Task] = set()

    def bind(self, submit: Submit) -> None:
        """How to broadcast from the event loop (through the engine thread), once the engine loop exists."""
        self._submit = submit

    @property
    def world(self) -> int:
        return len(self._addresses)

    def addresses(self) -> list[RankAddress]:
        return list(self._addresses)

    def prepare(self, session_id: str, wire_plan: TransferPlan) -> None:
        self.local.prepare(session_id, wire_plan)
        self._fire(Prepare(session_id, plan_key(wire_plan)))

    async def send(self, session_id: str, plan: TransferPlan, peers: Mapping[int, tuple[str, int]]) -> TransferStats:
        senders = {pair.src_rank for pair in plan.pairs} - {0}
        await self._submit(Send(session_id, plan_key(plan), [Peer(r, *address) for r, address in peers.items()]))
        own = await self.local.send(session_id, plan, peers)
        reports = await self._collect("send", session_id, senders, self.report_timeout_s)
        return combined([own, *(TransferStats(r.nbytes, r.seconds, r.messages) for r in reports)])

    async def receive(
        self, session_id: str, plan: TransferPlan, segments: Sequence[KvSegment], num_tokens: int, timeout: float
    ) -> TransferStats:
        receivers = {pair.dst_rank for pair in plan.pairs} - {0}
        await self._submit(Receive(session_id, plan_key(plan), list(segments), num_tokens, timeout))
        own = self.local.receive(session_id, plan, segments, num_tokens, timeout)
        theirs = self._collect("receive", session_id, receivers, timeout + 1.0)  # their own timeout answers first
        results = await asyncio.gather(own, theirs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        own_stats, reports = results
        return combined([own_stats, *(TransferStats(r.nbytes, r.seconds, r.messages) for r in reports)])

    def scatter(self, session_id: str, block_table: list[int]) -> None:
        """On the engine thread: every rank writes its received buffers into the same pages."""
        self._broadcast(Scatter(session_id, list(block_table)))
        self.local.scatter(session_id, block_table)

    async def probe(self, timeout: float) -> dict[int, RankReport]:
        """What every other rank holds (tables, sessions, bytes moved); empty unless every rank answers in time."""
        probe_id = f"probe-{uuid.uuid4().hex[:8]}"
        await self._submit(Probe(probe_id))
        try:
            reports = await self.board.collect("probe", probe_id, set(range(1, self.world)), timeout)
        except TimeoutError:
            return {}
        return {r.rank: r for r in reports}

    async def sample_kv(self, block_table: list[int], num_tokens: int, dp_group: int, timeout: float) -> dict[int, RankReport]:
        """The other ranks' samples of a request's first `num_tokens` K/V (empty shape: the rank holds none of it)."""
        probe_id = f"kv-{uuid.uuid4().hex[:8]}"
        await self._submit(SampleKv(probe_id, list(block_table), num_tokens, dp_group))
        reports = await self._collect("kv", probe_id, set(range(1, self.world)), timeout)
        return {r.rank: r for r in reports}

    def drop(self, session_id: str) -> None:
        self.local.drop(session_id)
        self.board.forget(session_id)
        self._fire(Drop(session_id))

    async def _collect(self, op: str, session_id: str, ranks: set[int], timeout: float) -> list[RankReport]:
        if not ranks:
            return []
        try:
            reports = await self.board.collect(op, session_id, ranks, timeout)
        except TimeoutError:
            raise KvTransferError(f"session {session_id!r}: ranks {sorted(ranks)} did not report their {op} within {timeout:.1f} s") from None
        failed = [r for r in reports if not r.ok]
        if failed:
            raise KvTransferError(f"session {session_id!r}: rank {failed[0].rank} {op} failed: {failed[0].error}")
        return reports

    def _fire(self, work: Work) -> None:
        """Broadcasts soon, without waiting (a drop or a prefetch must not block its caller)."""
        task = asyncio.ensure_future(self._submit(work))
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("rank_broadcast_failed", error=repr(task.exception()))
