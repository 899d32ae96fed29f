"""Paged KV cache: fixed-size pages (blocks) of K/V, handed out by a free-list allocator.

A token at position p of a sequence lives in page `block_table[p // block_size]` at
offset `p % block_size`; its *slot* is `page * block_size + offset`, an index into the
cache viewed as one flat run of token rows per layer.
"""

from __future__ import annotations

import torch

from shared.engine.config import ModelConfig


class BlockAllocator:
    """Hands out page ids; query/command pairs so callers check before they commit.

    A request's pages come as one contiguous run when the free space has one (first
    fit), else as the lowest free pages: attention then reads a contiguous context as a
    view instead of gathering it page by page.
    """

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._used = bytearray(num_blocks)  # 1 = allocated; bytes.find locates free runs in C
        self._num_free = num_blocks

    @property
    def num_free(self) -> int:
        return self._num_free

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self._num_free

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise RuntimeError(f"cannot allocate {n} blocks: {self._num_free} of {self.num_blocks} free")
        start = self._used.find(bytes(n)) if n else -1
        if start >= 0:
            blocks = list(range(start, start + n))
        else:
            blocks, at = [], -1
            for _ in range(n):
                at = self._used.find(0, at + 1)
                blocks.append(at)
        for block in blocks:
            self._used[block] = 1
        self._num_free -= n
        return blocks

    def free(self, blocks: list[int]) -> None:
        stray = [b for b in blocks if not (0 <= b < self.num_blocks and self._used[b])]
        if stray or len(set(blocks)) != len(blocks):
            # A double free would hand one page to two sequences later: fail loudly instead.
            raise ValueError(f"freeing blocks that are not allocated (or repeated): {stray or blocks}")
        for block in blocks:
            self._used[block] = 0
        self._num_free += len(blocks)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slots of `positions` for one sequence."""
    # block_table: [num_pages] int64, positions: [N] int64 -> slots: [N] int64
    return block_table[positions // block_size] * block_size + positions % block_size


class PagedKVCache:
    """K and V pages for every layer, head-major: `[num_layers, num_kv_heads, num_blocks, block_size, head_dim]`.

    Head-major so that a gather of pages hands attention `[H, B, S, D]` whose per-head,
    per-sequence `[S, D]` matrices are contiguous: batched matmuls read them directly.
    Exports and imports use the layout-free `[L, 2, S, H, D]` of a hand-off.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        *,
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
    ):
        """`num_layers` / `num_kv_heads`: a rank's own share (its stage's layers, its slice's heads); default all."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        layers = config.num_layers if num_layers is None else num_layers
        heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
        shape = (layers, heads, num_blocks, block_size, config.head_dim)
        self.key = torch.zeros(shape, dtype=dtype)
        self.value = torch.zeros(shape, dtype=dtype)
        # The same memory with one flat run of slots per layer and head: [L, H, slots, D] (views).
        self._key_slots = self.key.view(*shape[:2], -1, shape[-1])
        self._value_slots = self.value.view(*shape[:2], -1, shape[-1])

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        # slots: [T], key/value: [T, H, D] in any float dtype (cast to the cache's)
        self._key_slots[layer].index_copy_(1, slots, key.to(self.dtype).transpose(0, 1))
        self._value_slots[layer].index_copy_(1, slots, value.to(self.dtype).transpose(0, 1))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # slots: [S] -> key, value: [S, H, D] in the cache's dtype
        key = self._key_slots[layer].index_select(1, slots)  # [H, S, D]
        value = self._value_slots[layer].index_select(1, slots)
        return key.transpose(0, 1), value.transpose(0, 1)

    def read_pages(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole pages, concatenated per row: pages `[B, P]` -> key, value `[H, B, P * block_size, D]`.

        Copies whole pages (runs of block_size rows), much faster than a gather by slot.
        """
        batch, num_pages = pages.shape
        flat = pages.reshape(-1)
        shape = (self.key.shape[1], batch, num_pages * self.block_size, self.key.shape[-1])
        return self.key[layer].index_select(1, flat).view(shape), self.value[layer].index_select(1, flat).view(shape)

    def read_run(self, layer: int, first_slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots first_slot .. first_slot + length - 1 (consecutive pages): key, value `[H, length, D]` views, no copy."""
        end = first_slot + length
        return self._key_slots[layer, :, first_slot:end], self._value_slots[layer, :, first_slot:end]

    def hnd_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as `[L, blocks, H, page, D]` views (the re-shard kernels' HND layout, strided): no copy."""
        return self.key.permute(0, 2, 1, 3, 4), self.value.permute(0, 2, 1, 3, 4)

    def export(self, slots: torch.Tensor) -> torch.Tensor:
        """All layers' K and V of `slots` as one new contiguous `[L, 2, S, H, D]` tensor."""
        key = self._key_slots.index_select(2, slots).transpose(1, 2)  # [L, S, H, D]
        value = self._value_slots.index_select(2, slots).transpose(1, 2)
        return torch.stack((key, value), dim=1)

    def load(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Inverse of `export`: kv `[L, 2, S, H, D]` written into `slots` of every layer."""
        self._key_slots.index_copy_(2, slots, kv[:, 0].to(self.dtype).transpose(1, 2))
        self._value_slots.index_copy_(2, slots, kv[:, 1].to(self.dtype).transpose(1, 2))
