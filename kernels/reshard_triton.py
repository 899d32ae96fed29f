"""Decoder-side KV re-shard as a Triton kernel: pair buffers -> paged cache.

One launch per piece of a pair buffer (a piece is one `[layers][K/V][token][head][dim]`
rectangle; see `shared.transfer_plan`). Program `(i, j)` moves tokens
`[i*BLOCK_T, (i+1)*BLOCK_T)` of local layer `j // 2`, K if `j` is even else V: it reads
`BLOCK_T` contiguous rows of `heads*dim` elements and writes each token's heads into its
page slot, so head slicing/merging, any page size, NHD or HND (through the slot and head
strides) and the dtype cast are one pass over the bytes.

On CPU the kernel runs only under `TRITON_INTERPRET=1` (set before triton is imported);
the serving path on CPU is `shared.reshard.scatter.scatter_pair_buffers`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from shared.reshard.buffers import BlockTable, check_cache, page_ids, typed_buffer
from shared.reshard.page_map import pages_needed
from shared.transfer_plan import TransferPlan


@triton.jit
def _scatter_piece_kernel(
    src_ptr,  # piece start inside a pair buffer: [layers, 2, num_tokens, row] contiguous, wire dtype
    key_ptr,  # destination K cache (whole tensor, any memory layout; dim stride 1), cache dtype
    value_ptr,  # destination V cache, same shape/strides/dtype as K
    block_table_ptr,  # [>= cdiv(num_tokens, page_size)] int32/int64 page ids of the request
    num_tokens,  # T: tokens in the session
    row,  # elements per token and layer in the piece: piece heads * HEAD_DIM
    page_size,  # destination tokens per page
    layer_start,  # destination layer of the piece's local layer 0
    head_start,  # destination KV head of the piece's local head 0
    stride_layer,  # cache stride (elements) between layers
    stride_block,  # ... between pages
    stride_slot,  # ... between token slots inside a page (NHD: heads*dim, HND: dim)
    stride_head,  # ... between KV heads (NHD: dim, HND: page*dim)
    HEAD_DIM: tl.constexpr,  # elements per head
    BLOCK_T: tl.constexpr,  # tokens per program (power of two)
    BLOCK_ROW: tl.constexpr,  # power of two >= row
):
    pid_t = tl.program_id(0)
    pid_lk = tl.program_id(1).to(tl.int64)  # local layer * 2 + (0 for K, 1 for V)
    layer = pid_lk // 2
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cols = tl.arange(0, BLOCK_ROW)  # [BLOCK_ROW] = head * HEAD_DIM + d
    token_ok = tokens < num_tokens
    mask = token_ok[:, None] & (cols < row)[None, :]  # masked tails: last tokens, padded row

    src_offsets = (pid_lk * num_tokens + tokens.to(tl.int64))[:, None] * row + cols[None, :]
    values = tl.load(src_ptr + src_offsets, mask=mask)

    pages = tl.load(block_table_ptr + tokens // page_size, mask=token_ok, other=0).to(tl.int64)
    slots = (tokens % page_size).to(tl.int64)
    heads = (head_start + cols // HEAD_DIM).to(tl.int64)
    dst_offsets = (
        (layer_start + layer) * stride_layer
        + (pages * stride_block + slots * stride_slot)[:, None]
        + (heads * stride_head + cols % HEAD_DIM)[None, :]
    )
    if pid_lk % 2 == 0:
        tl.store(key_ptr + dst_offsets, values.to(key_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(value_ptr + dst_offsets, values.to(value_ptr.dtype.element_ty), mask=mask)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block_sizes(row: int) -> tuple[int, int]:
    block_row = triton.next_power_of_2(row)
    block_t = max(1, min(64, 4096 // block_row))
    return block_t, block_row


def _check_device(tensors: Sequence[torch.Tensor], device: torch.device) -> None:
    if any(t.device != device for t in tensors):
        raise ValueError(f"pair buffers, caches and block table must share one device ({device})")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton re-shard needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run on CPU")


def scatter_pair_buffers_triton(
    buffers: Sequence[torch.Tensor],
    plan: TransferPlan,
    dst_key: torch.Tensor,
    dst_value: torch.Tensor,
    dst_block_table: BlockTable,
    num_tokens: int,
) -> None:
    """Same contract as `scatter_pair_buffers`: writes every pair buffer into the paged cache."""
    spec = plan.dst_spec
    check_cache(dst_key, dst_value, spec, "destination cache")
    if dst_key.stride() != dst_value.stride() or dst_key.stride(-1) != 1:
        raise ValueError(f"K/V caches need equal strides and a contiguous head dim, got {dst_key.stride()} / {dst_value.stride()}")
    if len(buffers) != len(plan.pairs):
        raise ValueError(f"{len(buffers)} pair buffers for a plan of {len(plan.pairs)} pairs")
    if isinstance(dst_block_table, torch.Tensor):
        if dst_block_table.dtype not in (torch.int32, torch.int64) or dst_block_table.dim() != 1:
            raise ValueError(f"block table must be a 1-D int32/int64 tensor, got {dst_block_table.dtype} {tuple(dst_block_table.shape)}")
        if len(dst_block_table) < pages_needed(num_tokens, spec.page_size):
            raise ValueError(f"block table too short for {num_tokens} tokens of page size {spec.page_size}")
        table = dst_block_table.to(dst_key.device)
    else:
        table = page_ids(dst_block_table, num_tokens, spec.page_size, dst_key.device)
    typed = [typed_buffer(b, pair, plan, num_tokens) for b, pair in zip(buffers, plan.pairs)]
    if any(not b.is_contiguous() for b in typed):
        raise ValueError("pair buffers must be contiguous")
    _check_device([*typed, dst_value, table], dst_key.device)
    if num_tokens == 0:
        return
    # Strides in (layer, block, slot, head) terms whatever the memory layout.
    slot_dim, head_dim_index = (2, 3) if spec.memory_layout == "NHD" else (3, 2)
    strides = (dst_key.stride(0), dst_key.stride(1), dst_key.stride(slot_dim), dst_key.stride(head_dim_index))
    for buffer, pair in zip(typed, plan.pairs):
        for piece in pair.pieces:
            seg = piece.segment
            row = seg.num_heads * spec.head_dim
            block_t, block_row = _block_sizes(row)
            grid = (triton.cdiv(num_tokens, block_t), seg.num_layers * 2)
            _scatter_piece_kernel[grid](
                buffer[piece.offset(num_tokens) :],
                dst_key,
                dst_value,
                table,
                num_tokens,
                row,
                spec.page_size,
                seg.layer_start,
                seg.head_start,
                *strides,
                HEAD_DIM=spec.head_dim,
                BLOCK_T=block_t,
                BLOCK_ROW=block_row,
            )
