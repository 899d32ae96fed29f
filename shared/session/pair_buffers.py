"""The outgoing pair buffers of one rank's push, gathered one at a time in a worker thread
so that gathering pair `i+1` overlaps sending pair `i`.

Copies go into pooled staging memory (already faulted in); a pair that is one contiguous
slab of exported KV (every head of a run of layers) is sent in place, with no copy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from shared.reshard.buffers import BlockTable, check_cache
from shared.reshard.gather import gather_pair_buffers, pair_slab, slice_pair_buffer
from shared.transfer_plan import TransferPlan
from shared.transport.staging_pool import StagingPool


@dataclass(frozen=True)
class PagedKv:
    """A request's KV still in a rank's paged cache (pushed without an export copy).

    The cache must keep these pages unchanged until the push returns (the gather runs in a thread).
    """

    key: torch.Tensor  # [L, blocks, page, H, D] (NHD) or [L, blocks, H, page, D] (HND), this rank's layers and heads
    value: torch.Tensor
    block_table: BlockTable
    num_tokens: int


LocalKv = torch.Tensor | PagedKv  # a rank's KV of one request: exported [L_r, 2, T, H_r, D] or in its pages


def num_tokens_of(kv: LocalKv, plan: TransferPlan) -> int:
    """Tokens in a rank's KV, after checking it against the rank view's source spec."""
    spec = plan.src_spec
    if isinstance(kv, PagedKv):
        check_cache(kv.key, kv.value, spec, "prefill cache")
        return kv.num_tokens
    expected = (spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[4]) != expected or kv.dtype != spec.dtype:
        raise ValueError(f"KV {tuple(kv.shape)} {kv.dtype} is not this rank's [L, 2, T, H, D] = {expected} {spec.dtype}")
    return kv.shape[2]


class PairBuffers:
    """Pair buffers `indices` of a rank view `plan`, gathered in order, the next one ahead."""

    def __init__(self, kv: LocalKv, plan: TransferPlan, indices: Sequence[int], pool: StagingPool):
        self.kv, self.plan, self.indices, self.pool = kv, plan, list(indices), pool
        self.num_tokens = num_tokens_of(kv, plan)
        self.handed_out = 0
        self._staging: list[torch.Tensor] = []  # taken from the pool
        self._next: asyncio.Future[torch.Tensor] | None = None
        self._position = 0

    def prefetch(self) -> None:
        """Starts gathering the next pair unless one is under way or none is left."""
        if self._next is None and self._position < len(self.indices):
            self._next = asyncio.ensure_future(asyncio.to_thread(self._gather, self.indices[self._position]))
            self._position += 1

    async def stream(self) -> AsyncIterator[torch.Tensor]:
        """Each pair's buffer in order, the next one already gathering when one is yielded."""
        while True:
            self.prefetch()
            if self._next is None:
                return
            buffer = await self._next
            self._next = None
            self.prefetch()
            self.handed_out += 1
            yield buffer

    async def close(self, recycle: bool) -> None:
        """Returns staging to the pool, or forgets it when a failed send may still read it."""
        if self._next is not None:  # its thread cannot be stopped: let it finish first
            with contextlib.suppress(Exception):
                await self._next
            self._next = None
        for buffer in self._staging:
            if recycle:
                self.pool.give_back(buffer)
            else:
                self.pool.forget(buffer)
        self._staging.clear()

    def _gather(self, index: int) -> torch.Tensor:
        kv, plan = self.kv, self.plan
        if not isinstance(kv, PagedKv):
            slab = pair_slab(kv, plan, index)
            if slab is not None:
                return slab
        staging = self.pool.take(plan.pair_nbytes(plan.pairs[index], self.num_tokens))
        self._staging.append(staging)
        if isinstance(kv, PagedKv):
            return gather_pair_buffers(kv.key, kv.value, kv.block_table, kv.num_tokens, plan, out=[staging], pairs=[index])[0]
        return slice_pair_buffer(kv, plan, index, out=staging)
