"""A non-leader rank: runs what its leader broadcasts, moves its own KV, answers through the store.

Two threads of control, as the leader has:
- the collective thread receives each message and runs steps, exports and scatters in
  order (they touch the rank's cache and take part in collectives);
- the event loop runs the rank's UCX sends and receives (`RankTransfer`), which finish on
  their own time and report through the store queue.
A broken group (the leader or another rank gone: a collective fails or times out) ends the
process with a message naming what failed; the launcher or torchrun sees the exit.
"""

from __future__ import annotations

import asyncio
import threading

import structlog
import torch
import torch.distributed as dist

from shared.engine.engine import Engine
from shared.engine.step_work import (
    Drop,
    Export,
    Keepalive,
    Prepare,
    Probe,
    Receive,
    SampleKv,
    Scatter,
    Send,
    Step,
    Stop,
    Work,
)
from shared.ranks.channel import FollowerChannel
from shared.ranks.reports import RankReport, post_report
from shared.session.errors import KvTransferError
from shared.session.rank_transfer import RankTransfer
from shared.session.wire import layout_from_wire, spec_from_wire
from shared.transfer_plan import TransferPlan, plan_transfer

log = structlog.get_logger()


def transfer_plan(key) -> TransferPlan:
    """The plan a `PlanKey` names (cached: every rank computes the same one)."""
    return plan_transfer(
        layout_from_wire(key.src_layout), layout_from_wire(key.dst_layout), spec_from_wire(key.src_spec),
        spec_from_wire(key.dst_spec), key.dst_dp_group,
    )


class Follower:
    def __init__(self, engine: Engine, transfer: RankTransfer, store: dist.Store):
        self.engine = engine  # its runner and cache; the scheduler stays idle on a follower
        self.transfer = transfer
        self.store = store
        self.rank = transfer.rank
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> str:
        """Follows until the leader says stop (returns its reason) or the group breaks (raises)."""
        self._loop = asyncio.get_running_loop()
        ended: asyncio.Future[str] = self._loop.create_future()

        def collective_thread() -> None:
            try:
                reason = self._follow()
                self._loop.call_soon_threadsafe(_resolve, ended, reason)
            except BaseException as exc:  # noqa: BLE001 (any failure here ends the rank)
                self._loop.call_soon_threadsafe(_fail, ended, exc)

        threading.Thread(target=collective_thread, name=f"rank{self.rank}-collectives", daemon=True).start()
        return await ended

    @torch.inference_mode()  # as the leader's engine steps: no autograd state on any rank
    def _follow(self) -> str:
        channel = FollowerChannel()
        runner = self.engine.runner
        while True:
            work = channel.receive()
            match work:
                case Step():
                    runner.run(work)
                case Export(request_id=request_id, block_table=table, num_tokens=num_tokens):
                    self.transfer.hold(request_id, runner.export(table, num_tokens))
                case Scatter(session_id=session_id, block_table=table):
                    self.transfer.scatter(session_id, table)
                case Receive(session_id=session_id, plan=key) if not self.transfer.has_part(transfer_plan(key), "dst"):
                    # Recorded here, in channel order: the leader does not wait for ranks with no part,
                    # so its Scatter may come next, before this rank's event loop would get to it.
                    self.transfer.expect_nothing(session_id)
                case Prepare() | Send() | Receive() | Drop():
                    self._loop.call_soon_threadsafe(self._start, work)
                case Keepalive(forget=forget):
                    for request_id in forget:
                        runner.tables.pop(request_id, None)
                case SampleKv(probe_id=probe_id, block_table=table, num_tokens=num_tokens, dp_group=group):
                    report = RankReport("kv", probe_id, self.rank, True)
                    if group == runner.shard.dp_group:
                        sample = runner.export(table, num_tokens)
                        report.shape, report.values = list(sample.shape), sample.float().flatten().tolist()
                    post_report(self.store, report)
                case Probe(probe_id=probe_id):
                    report = RankReport(
                        "probe", probe_id, self.rank, True, bytes_sent=self.transfer.bytes_sent,
                        bytes_received=self.transfer.bytes_received, tables=len(runner.tables), sessions=self.transfer.num_sessions,
                    )
                    post_report(self.store, report)
                case Stop(reason=reason):
                    return reason

    def _start(self, work: Work) -> None:
        task = asyncio.ensure_future(self._move(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _move(self, work: Work) -> None:
        transfer = self.transfer
        match work:
            case Prepare(session_id=session_id, plan=key):
                transfer.prepare(session_id, transfer_plan(key))
            case Drop(session_id=session_id):
                transfer.drop(session_id)
            case Send(session_id=session_id, plan=key, peers=peers):
                plan = transfer_plan(key)
                if transfer.has_part(plan, "src"):  # the leader waits only for ranks with pairs to send
                    await self._report("send", session_id, transfer.send(session_id, plan, {p.rank: (p.host, p.port) for p in peers}))
            case Receive(session_id=session_id, plan=key, segments=segments, num_tokens=num_tokens, timeout=timeout):
                # Only a rank with a part gets here (`_follow` records the others at once).
                await self._report("receive", session_id, transfer.receive(session_id, transfer_plan(key), segments, num_tokens, timeout))

    async def _report(self, op: str, session_id: str, move) -> None:
        try:
            stats = await move
            report = RankReport(op, session_id, self.rank, True, stats.nbytes, stats.seconds, stats.num_messages)
        except KvTransferError as exc:
            report = RankReport(op, session_id, self.rank, False, error=str(exc))
        except Exception as exc:  # the move failed on this rank: the leader fails the session, the rank goes on
            report = RankReport(op, session_id, self.rank, False, error=repr(exc))
        report.bytes_sent, report.bytes_received = self.transfer.bytes_sent, self.transfer.bytes_received
        await asyncio.to_thread(post_report, self.store, report)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
