"""The ranks of one worker instance, as the leader's session engine sees them.

The leader decides what moves; every rank moves its own bytes (`RankTransfer`). A group
fans one decision out to all ranks and gathers their answers:

- `InProcessGroup`: every rank's `RankTransfer` lives in this process. Serving uses it for a
  one-rank worker; tests use it to run the whole multi-rank protocol without processes.
- `shared.ranks.leader_group.LeaderGroup`: rank 0 of a real multi-process group; the other
  ranks are told over the group's control channel and answer through its report board.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Protocol

from shared.protocol import KvSegment, RankAddress, TransferStats
from shared.session.rank_transfer import RankTransfer
from shared.transfer_plan import TransferPlan


class RankGroup(Protocol):
    @property
    def world(self) -> int: ...

    def addresses(self) -> list[RankAddress]:
        """Every rank's KV address, in rank order (what a decoder's acceptance carries)."""
        ...

    def prepare(self, session_id: str, wire_plan: TransferPlan) -> None:
        """Lets each rank start gathering its first pair while the offer travels."""
        ...

    async def send(self, session_id: str, plan: TransferPlan, peers: Mapping[int, tuple[str, int]]) -> TransferStats:
        """Every rank sends its pairs of `plan`; combined stats, or the first rank's failure."""
        ...

    async def receive(
        self, session_id: str, plan: TransferPlan, segments: Sequence[KvSegment], num_tokens: int, timeout: float
    ) -> TransferStats:
        """Every rank posts its receives; returns when all hold their buffers."""
        ...

    def scatter(self, session_id: str, block_table: list[int]) -> None:
        """Every rank writes its received KV into the same pages (called on the engine thread)."""
        ...

    def drop(self, session_id: str) -> None:
        """Every rank forgets the session (held or received KV, posted receives)."""
        ...


def combined(stats: Sequence[TransferStats]) -> TransferStats:
    """Ranks move bytes in parallel: bytes and messages add up, the time is the slowest rank's."""
    return TransferStats(sum(s.nbytes for s in stats), max((s.seconds for s in stats), default=0.0), sum(s.num_messages for s in stats))


class InProcessGroup:
    def __init__(self, ranks: Sequence[RankTransfer]):
        if [r.rank for r in ranks] != list(range(len(ranks))):
            raise ValueError("ranks must be 0..N-1 in order")
        self.ranks = list(ranks)

    @property
    def world(self) -> int:
        return len(self.ranks)

    def addresses(self) -> list[RankAddress]:
        return [RankAddress(r.rank, *r.transport.address()) for r in self.ranks]

    def prepare(self, session_id: str, wire_plan: TransferPlan) -> None:
        for rank in self.ranks:
            rank.prepare(session_id, wire_plan)

    async def send(self, session_id: str, plan: TransferPlan, peers: Mapping[int, tuple[str, int]]) -> TransferStats:
        return combined(await asyncio.gather(*(r.send(session_id, plan, peers) for r in self.ranks)))

    async def receive(
        self, session_id: str, plan: TransferPlan, segments: Sequence[KvSegment], num_tokens: int, timeout: float
    ) -> TransferStats:
        tasks = [asyncio.ensure_future(r.receive(session_id, plan, segments, num_tokens, timeout)) for r in self.ranks]
        try:
            return combined(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    def scatter(self, session_id: str, block_table: list[int]) -> None:
        for rank in self.ranks:
            rank.scatter(session_id, block_table)

    def drop(self, session_id: str) -> None:
        for rank in self.ranks:
            rank.drop(session_id)
