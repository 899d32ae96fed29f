"""One forward pass's worth of work: new tokens of several sequences, flattened, plus where their KV lives.

Sequence i contributes `num_new[i]` consecutive tokens to the flat input, at positions
`num_cached[i] .. num_cached[i] + num_new[i] - 1`; a prefill has num_cached == 0 and a
decode step has num_new == 1, and a batch may mix both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.engine.kv_cache import slot_mapping


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's part of a forward pass."""

    block_table: list[int]  # pages holding this sequence's KV, in position order
    num_cached: int  # tokens whose K/V are already in the cache
    num_new: int  # tokens fed in this pass

    def __post_init__(self) -> None:
        if self.num_cached < 0 or self.num_new <= 0:
            raise ValueError(f"need num_cached >= 0 and num_new > 0, got {self.num_cached}, {self.num_new}")


@dataclass(frozen=True)
class ForwardBatch:
    positions: torch.Tensor  # [T] int64: absolute position of each new token
    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to
    num_new: list[int]  # per sequence; sums to T
    context_slots: list[torch.Tensor]  # per sequence: [S_i] slots of positions 0 .. S_i - 1 (cached + new)
    attn_masks: list[torch.Tensor]  # per sequence: [num_new_i, S_i] bool, True = may attend
    last_token_index: torch.Tensor  # [num_seqs] int64: row of each sequence's last new token in the flat input

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @classmethod
    def build(cls, chunks: list[SequenceChunk], block_size: int) -> ForwardBatch:
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence")
        positions, slots, context, masks = [], [], [], []
        for chunk in chunks:
            total = chunk.num_cached + chunk.num_new
            if len(chunk.block_table) * block_size < total:
                raise ValueError(f"block table of {len(chunk.block_table)} pages cannot hold {total} tokens")
            table = torch.tensor(chunk.block_table, dtype=torch.int64)
            all_positions = torch.arange(total, dtype=torch.int64)
            context_slots = slot_mapping(table, all_positions, block_size)  # [S]
            positions.append(all_positions[chunk.num_cached:])
            slots.append(context_slots[chunk.num_cached:])
            context.append(context_slots)
            masks.append(_causal_mask(chunk.num_cached, chunk.num_new))
        num_new = [c.num_new for c in chunks]
        last = torch.tensor(num_new, dtype=torch.int64).cumsum(0) - 1
        return cls(torch.cat(positions), torch.cat(slots), num_new, context, masks, last)


def _causal_mask(num_cached: int, num_new: int) -> torch.Tensor:
    """New token j (at position num_cached + j) sees every position up to and including its own."""
    key_pos = torch.arange(num_cached + num_new)  # [S]
    query_pos = torch.arange(num_new) + num_cached  # [n]
    return key_pos[None, :] <= query_pos[:, None]  # [n, S]
