"""What one decoder rank received for a session: its pair buffers, arrived and size-checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from shared.protocol import TransferStats
from shared.reshard.buffers import BlockTable, check_buffers, piece_view, typed_buffer
from shared.reshard.scatter import scatter_pair_buffers
from shared.transfer_plan import TransferPlan


@dataclass
class RankReceived:
    """Pair buffers in `plan.pairs` order; `plan` is the rank's view (local layers and heads)."""

    session_id: str
    plan: TransferPlan
    num_tokens: int
    buffers: list[torch.Tensor]  # raw bytes, staged on the host
    stats: TransferStats

    def write_into(
        self, key: torch.Tensor, value: torch.Tensor, block_table: BlockTable,
        *, kernel: Literal["torch", "triton"] = "torch",
    ) -> None:
        """Re-shard into this rank's paged cache (pages from `block_table`)."""
        if kernel == "triton":
            from kernels.reshard_triton import scatter_pair_buffers_triton

            staged = [buffer.to(key.device, non_blocking=True) for buffer in self.buffers]
            scatter_pair_buffers_triton(staged, self.plan, key, value, block_table, self.num_tokens)
        else:
            scatter_pair_buffers(self.buffers, self.plan, key, value, block_table, self.num_tokens)

    def shard(self) -> torch.Tensor:
        """This rank's KV `[its layers, 2, T, its heads, D]` in the decoder's dtype (tests, debugging)."""
        check_buffers(self.buffers, self.plan)
        spec = self.plan.dst_spec
        out = torch.empty((spec.num_layers, 2, self.num_tokens, spec.num_kv_heads, spec.head_dim), dtype=spec.dtype)
        for buffer, pair in zip(self.buffers, self.plan.pairs):
            flat = typed_buffer(buffer, pair, self.plan, self.num_tokens)
            for piece in pair.pieces:
                seg = piece.segment
                out[seg.layer_start : seg.layer_stop, :, :, seg.head_start : seg.head_stop] = piece_view(flat, piece, self.num_tokens)
        return out
