"""Paged KV cache: fixed-size pages (blocks) of K/V, handed out by a free-list allocator.

A token at position p of a sequence lives in page `block_table[p // block_size]` at
offset `p % block_size`; its *slot* is `page * block_size + offset`, an index into the
cache viewed as one flat run of token rows per layer.
"""

from __future__ import annotations

from collections import deque

import torch

from shared.engine.config import ModelConfig


class BlockAllocator:
    """Hands out page ids; query/command pairs so callers check before they commit."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise RuntimeError(f"cannot allocate {n} blocks: {len(self._free)} of {self.num_blocks} free")
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        stray = [b for b in blocks if b not in self._used]
        if stray or len(set(blocks)) != len(blocks):
            # A double free would hand one page to two sequences later: fail loudly instead.
            raise ValueError(f"freeing blocks that are not allocated (or repeated): {stray or blocks}")
        self._used.difference_update(blocks)
        self._free.extend(blocks)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slots of `positions` for one sequence."""
    # block_table: [num_pages] int64, positions: [N] int64 -> slots: [N] int64
    return block_table[positions // block_size] * block_size + positions % block_size


class PagedKVCache:
    """K and V pages for every layer: `[num_layers, num_blocks, block_size, num_kv_heads, head_dim]` (NHD in a page)."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.key = torch.zeros(shape, dtype=dtype)
        self.value = torch.zeros(shape, dtype=dtype)

    def _flat(self, cache: torch.Tensor) -> torch.Tensor:
        # [L, blocks, block_size, H, D] -> [L, slots, H, D] (a view: pages are contiguous)
        return cache.view(cache.shape[0], -1, *cache.shape[3:])

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        # slots: [T], key/value: [T, H, D] in any float dtype (cast to the cache's)
        self._flat(self.key)[layer].index_copy_(0, slots, key.to(self.dtype))
        self._flat(self.value)[layer].index_copy_(0, slots, value.to(self.dtype))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # slots: [S] -> key, value: [S, H, D] in the cache's dtype
        return self._flat(self.key)[layer].index_select(0, slots), self._flat(self.value)[layer].index_select(0, slots)

    def export(self, slots: torch.Tensor) -> torch.Tensor:
        """All layers' K and V of `slots` as one new contiguous `[L, 2, S, H, D]` tensor."""
        key = self._flat(self.key).index_select(1, slots)  # [L, S, H, D]
        value = self._flat(self.value).index_select(1, slots)
        return torch.stack((key, value), dim=1)

    def load(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Inverse of `export`: kv `[L, 2, S, H, D]` written into `slots` of every layer."""
        self._flat(self.key).index_copy_(1, slots, kv[:, 0].to(self.dtype))
        self._flat(self.value).index_copy_(1, slots, kv[:, 1].to(self.dtype))
