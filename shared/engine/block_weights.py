"""Weights kept in llama.cpp's block formats: 32 weights per block, scaled small integers.

    Q4_1: 20 bytes = float16 d, float16 m, 16 bytes of 4-bit q  -> weight = d * q + m
    Q8_0: 34 bytes = float16 d, 32 signed bytes q               -> weight = d * q

A `BlockWeight` is an `[out, in]` matrix as `[out, in / 32 * block_bytes]` uint8: each
output row's blocks are consecutive, so permuting or stacking rows keeps blocks whole
(llama's Q/K un-permutation, fused projections). `dequantize` gives the float32 values;
a GGUF's dense float32 weights are exactly these, which `matches` checks bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

BLOCK_ELEMENTS = 32


class BlockFormat(IntEnum):
    """Values are the C kernel's format codes (block_matmul.c)."""

    Q4_1 = 0
    Q8_0 = 1

    @property
    def block_bytes(self) -> int:
        return 20 if self is BlockFormat.Q4_1 else 34


@dataclass(frozen=True)
class BlockWeight:
    format: BlockFormat
    blocks: torch.Tensor  # uint8 [out, in / 32 * block_bytes], contiguous
    in_features: int

    def __post_init__(self) -> None:
        if self.in_features <= 0 or self.in_features % BLOCK_ELEMENTS:
            raise ValueError(f"in_features {self.in_features} is not a positive multiple of {BLOCK_ELEMENTS}")
        row_bytes = self.in_features // BLOCK_ELEMENTS * self.format.block_bytes
        if self.blocks.dtype != torch.uint8 or self.blocks.dim() != 2 or self.blocks.shape[1] != row_bytes:
            raise ValueError(f"{self.format.name} blocks for {self.in_features} inputs must be uint8 [out, {row_bytes}]")
        if not self.blocks.is_contiguous():
            raise ValueError("blocks must be contiguous")

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dequantize(self) -> torch.Tensor:
        """The float32 `[out, in]` weights (as llama.cpp and gguf-py compute them)."""
        blocks = self.blocks.view(self.out_features, -1, self.format.block_bytes)  # [out, nb, bytes]
        scale = blocks[..., 0:2].contiguous().view(torch.float16).float()  # [out, nb, 1]
        if self.format is BlockFormat.Q4_1:
            offset = blocks[..., 2:4].contiguous().view(torch.float16).float()
            packed = blocks[..., 4:]  # [out, nb, 16]: weight j low nibble, weight j + 16 high nibble
            q = torch.cat((packed & 0x0F, packed >> 4), dim=-1).float()  # [out, nb, 32]
            values = scale * q + offset  # d * q is exact in float32; one rounding, as gguf-py's
        else:
            values = scale * blocks[..., 2:].contiguous().view(torch.int8).float()
        return values.reshape(self.out_features, self.in_features)

    def select_rows(self, rows: torch.Tensor) -> BlockWeight:
        """The weight made of the given output rows (int64 indices), in that order."""
        return BlockWeight(self.format, self.blocks.index_select(0, rows), self.in_features)

    def matches(self, dense: torch.Tensor, row_step: int = 1) -> bool:
        """Whether `dense` holds exactly these float32 weights, compared on every `row_step`-th row and the last."""
        if dense.dtype != torch.float32 or dense.shape != self.shape:
            return False
        rows = torch.cat((torch.arange(0, self.out_features, row_step), torch.tensor([self.out_features - 1])))
        return torch.equal(self.select_rows(rows).dequantize(), dense.index_select(0, rows))


def stack_rows(weights: list[BlockWeight]) -> BlockWeight:
    """One weight whose rows are those of `weights` in order (a fused projection); same format and inputs."""
    first = weights[0]
    if any(w.format is not first.format or w.in_features != first.in_features for w in weights):
        raise ValueError("only weights of one format and input size stack")
    return BlockWeight(first.format, torch.cat([w.blocks for w in weights]), first.in_features)
