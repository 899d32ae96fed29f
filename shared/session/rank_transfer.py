"""One rank's end of KV hand-offs: the KV it exported, what it received, its own transport.

Every rank of a worker instance has one (the leader too). It sends only its own segments
and receives only its own, over its own transport (its own UCX listener and endpoints), so
no KV byte passes through a rank that does not hold it. The leader decides *what* moves
(offers, placement) and tells each rank through its group (`shared/session/group.py`).

Outbox: the prefill side's exported KV per session, until sent or dropped.
Inbox: the decoder side's received pair buffers per session, until scattered or dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import structlog
import torch

from shared.protocol import KvSegment, TransferStats
from shared.session.errors import KvTransferError
from shared.session.pair_buffers import LocalKv, PairBuffers
from shared.session.rank_plan import rank_view
from shared.session.received import RankReceived
from shared.session.transport import KvTransport
from shared.transfer_plan import TransferPlan
from shared.transport.staging_pool import StagingPool
from shared.transport.ucx_kv import segment_tag

log = structlog.get_logger()

CacheViews = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # this rank's K and V paged cache, in its spec's layout


class RankTransfer:
    def __init__(self, rank: int, transport: KvTransport, cache: CacheViews | None = None, staging: StagingPool | None = None):
        self.rank = rank
        self.transport = transport
        self.cache = cache
        self.staging = staging if staging is not None else StagingPool()
        self.outbox: dict[str, LocalKv] = {}
        self.inbox: dict[str, RankReceived] = {}
        self._pending: dict[str, PairBuffers] = {}  # gathers started before the decoder answered
        self._receiving: dict[str, asyncio.Task] = {}
        self._no_part: set[str] = set()  # sessions this rank receives nothing of (another DP group's, say)
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- prefill side ----------------------------------------------------------------------

    def hold(self, session_id: str, kv: LocalKv) -> None:
        """Keeps this rank's KV of a session until it is sent or dropped."""
        self.outbox[session_id] = kv

    def prepare(self, session_id: str, wire_plan: TransferPlan) -> None:
        """Starts gathering the first pair while the offer travels (the wire format depends on the source only)."""
        kv = self.outbox.get(session_id)
        view = rank_view(wire_plan, "src", self.rank)
        if kv is None or not view.pairs or session_id in self._pending:
            return
        buffers = PairBuffers(kv, view, range(len(view.pairs)), self.staging)
        buffers.prefetch()
        self._pending[session_id] = buffers

    async def send(self, session_id: str, plan: TransferPlan, peers: Mapping[int, tuple[str, int]]) -> TransferStats:
        """Sends this rank's pairs of `plan` to the destination ranks at `peers` (rank -> address).

        The KV stays held (a failed hand-off may be retried on another decoder) until `drop`.
        """
        view = rank_view(plan, "src", self.rank)
        kv = self.outbox.get(session_id)
        prepared = self._pending.pop(session_id, None)
        if kv is None:
            if prepared is not None:
                await prepared.close(recycle=True)
            if view.pairs:
                raise KvTransferError(f"session {session_id!r}: rank {self.rank} holds no KV for it (dropped or expired)")
            return TransferStats(0, 0.0, 0)
        started = time.perf_counter()
        by_peer: dict[int, list[int]] = {}
        for index, pair in enumerate(view.pairs):
            by_peer.setdefault(pair.dst_rank, []).append(index)
        missing = sorted(set(by_peer) - set(peers))
        if missing:
            raise KvTransferError(f"session {session_id!r}: no address for destination ranks {missing}")
        groups: list[PairBuffers] = []
        if prepared is not None and len(by_peer) == 1:
            groups.append(prepared)  # one peer: the gather already under way is the one we need
        elif prepared is not None:
            await prepared.close(recycle=True)
        if not groups:
            groups = [PairBuffers(kv, view, indices, self.staging) for indices in by_peer.values()]
        sends = [
            self.transport.send(peers[dst], [self._segment(session_id, view, i, buffers.num_tokens) for i in indices], buffers.stream())
            for (dst, indices), buffers in zip(by_peer.items(), groups)
        ]
        sent = False
        try:
            results = await asyncio.gather(*sends)
            sent = True
        finally:
            for buffers in groups:  # a failed send may still read its buffers: those are dropped, not reused
                await buffers.close(recycle=sent or buffers.handed_out == 0)
        nbytes = sum(r.nbytes for r in results)
        self.bytes_sent += nbytes
        return TransferStats(nbytes, time.perf_counter() - started, sum(r.num_messages for r in results))

    @staticmethod
    def _segment(session_id: str, view: TransferPlan, index: int, num_tokens: int) -> KvSegment:
        pair = view.pairs[index]
        tag = segment_tag(session_id, pair.src_rank, pair.dst_rank)
        return KvSegment(pair.src_rank, pair.dst_rank, tag, view.pair_nbytes(pair, num_tokens))

    # -- decoder side ----------------------------------------------------------------------

    async def receive(self, session_id: str, plan: TransferPlan, segments: Sequence[KvSegment], num_tokens: int, timeout: float) -> TransferStats:
        """Posts this rank's receives and waits until every one arrived, intact, within `timeout`."""
        view = rank_view(plan, "dst", self.rank)
        mine = [seg for seg in segments if seg.dst_rank == self.rank]
        if not mine:
            self.expect_nothing(session_id)
            return TransferStats(0, 0.0, 0)
        task = asyncio.ensure_future(self.transport.receive(mine, timeout))
        self._receiving[session_id] = task
        try:
            buffers, stats = await task
        except TimeoutError:
            raise KvTransferError(f"session {session_id!r}: KV did not arrive at rank {self.rank} within {timeout:.1f} s") from None
        except asyncio.CancelledError:
            raise
        except Exception as error:  # transport failure: the session fails, the rank keeps serving
            raise KvTransferError(f"session {session_id!r}: rank {self.rank} receive failed: {error!r}") from None
        finally:
            self._receiving.pop(session_id, None)
        sizes = [b.numel() * b.element_size() for b in buffers]
        expected = [s.nbytes for s in mine]
        if sizes != expected:
            raise KvTransferError(f"session {session_id!r}: rank {self.rank} received {sizes} bytes per segment, expected {expected}")
        self.bytes_received += sum(sizes)
        self.inbox[session_id] = RankReceived(session_id, view, num_tokens, list(buffers), stats)
        return stats

    def expect_nothing(self, session_id: str) -> None:
        """Records that no KV of this session comes to this rank, so its scatter skips it."""
        self._no_part.add(session_id)

    def scatter(self, session_id: str, block_table: list[int]) -> None:
        """Writes the received KV into this rank's pages (the engine thread, between steps)."""
        if session_id in self._no_part:
            self._no_part.discard(session_id)
            return  # another rank's (or DP group's) request: nothing of it lands here
        received = self.inbox.pop(session_id, None)
        if received is None:
            raise KvTransferError(f"session {session_id!r}: rank {self.rank} has no received KV for it")
        if self.cache is None:
            raise RuntimeError(f"rank {self.rank} has no cache to scatter into")
        received.write_into(*self.cache(), block_table)

    # -- both ------------------------------------------------------------------------------

    def drop(self, session_id: str) -> None:
        """Forgets a session on this rank: KV held or received, receives still posted."""
        self.outbox.pop(session_id, None)
        self.inbox.pop(session_id, None)
        self._no_part.discard(session_id)
        task = self._receiving.pop(session_id, None)
        if task is not None:
            task.cancel()
        prepared = self._pending.pop(session_id, None)
        if prepared is not None:
            asyncio.ensure_future(prepared.close(recycle=True))

    @property
    def num_sessions(self) -> int:
        """Sessions holding memory on this rank (tests check this returns to 0)."""
        return len(self.outbox) + len(self.inbox) + len(self._receiving) + len(self._pending) + len(self._no_part)

    def has_part(self, plan: TransferPlan, side: str) -> bool:
        """Whether this rank sends (side "src") or receives ("dst") any pair of `plan`."""
        return bool(rank_view(plan, side, self.rank).pairs)
