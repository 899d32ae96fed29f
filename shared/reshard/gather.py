"""Prefill side of the re-shard: one contiguous buffer per (src rank, dst rank) pair.

- `gather_pair_buffers`: from a paged cache (one `index_select` of token rows per layer and
  K/V, `_SlotRows`; pieces that are whole pages move as pages).
- `slice_pair_buffer`: from exported KV `[L, 2, T, H, D]`; a pair that is one contiguous
  slab of it is sent in place (`pair_slab`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared.kv_spec import KvSpec
from shared.reshard.buffers import as_nhd, by_layer, check_cache, page_views, piece_heads, piece_view, typed_buffer
from shared.reshard.page_image import is_page_slab, read_piece
from shared.reshard.page_map import BlockTable, PageMap, block_list
from shared.transfer_plan import TransferPlan


def gather_pair_buffers(
    src_key: torch.Tensor,
    src_value: torch.Tensor,
    block_table: BlockTable,
    num_tokens: int,
    plan: TransferPlan,
    out: Sequence[torch.Tensor] | None = None,
    pairs: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Prefill side: one contiguous 1-D buffer (source dtype) per pair of `plan`.

    `pairs` (optional) picks which of `plan.pairs` to gather, by index (default: all); the
    result follows its order. `out` (optional, e.g. from a staging pool, in the same order)
    supplies the buffers; otherwise new ones are allocated.
    """
    spec = plan.src_spec
    check_cache(src_key, src_value, spec, "source cache")
    chosen = [plan.pairs[i] for i in (range(len(plan.pairs)) if pairs is None else pairs)]
    if out is not None and len(out) != len(chosen):
        raise ValueError(f"{len(out)} out buffers for {len(chosen)} pairs")
    buffers = []
    for index, pair in enumerate(chosen):
        if out is None:
            buffers.append(torch.empty(pair.numel(num_tokens), dtype=spec.dtype, device=src_key.device))
        else:
            buffers.append(typed_buffer(out[index], pair, plan, num_tokens))
    work = [(p, piece_view(b, p, num_tokens)) for b, pair in zip(buffers, chosen) for p in pair.pieces]
    if not (src_key.is_contiguous() and src_value.is_contiguous()):
        blocks = block_list(block_table, num_tokens, spec.page_size)
        caches = (as_nhd(src_key, spec), as_nhd(src_value, spec))
        for piece, piece_rows in work:
            seg = piece.segment
            for kv, cache in enumerate(caches):
                region = cache[seg.layer_start : seg.layer_stop, :, :, seg.head_start : seg.head_stop]
                for pages, rows in page_views(region, piece_rows[:, kv], blocks, spec.page_size):
                    rows.copy_(pages)
        return buffers
    page_map = PageMap(block_table, num_tokens, spec.page_size, src_key.device)
    slot_rows: dict[range, _SlotRows] = {}
    for layer, here in by_layer(work):
        for kv, cache in enumerate((src_key, src_value)):
            for piece, piece_rows in here:
                heads, rows = piece_heads(piece), piece_rows[layer - piece.segment.layer_start, kv]
                if is_page_slab(spec, heads):
                    read_piece(cache[layer], spec, page_map, heads, rows)
                    continue
                if heads not in slot_rows:
                    slot_rows[heads] = _SlotRows(spec, page_map, heads)
                slot_rows[heads].gather(cache[layer], rows)
    return buffers


class _SlotRows:
    """Where a piece's wire rows live in one layer of a paged cache, for the gather.

    The piece's `[T, heads, dim]` for one layer and K/V is viewed as 2-D wire rows, and the
    cache layer as rows of the same width: NHD `[blocks, page, H, D]`, one row per token
    slot (`h * D` of it: a strided view for a head subset); HND `[blocks, H, page, D]`,
    one row per (token, head), `D` wide. `index[i]` is the cache row of wire row `i`, so
    the gather is one `index_select` per layer and K/V, straight into the pair buffer (in
    one pass, it beats going through a page image on the read side).
    """

    def __init__(self, spec: KvSpec, pages: PageMap, heads: range):
        page, dim = spec.page_size, spec.head_dim
        device = pages.full_blocks.device
        blocks = pages.full_blocks if pages.tail_block is None else torch.cat(
            [pages.full_blocks, torch.tensor([pages.tail_block], device=device)]
        )
        tokens = torch.arange(pages.num_full * page + pages.tail_tokens, device=device)
        slots = blocks[tokens // page] * page + tokens % page  # [T]
        self.hnd, self.heads, self.dim = spec.memory_layout == "HND", heads, dim
        self.width = dim if self.hnd else len(heads) * dim
        if self.hnd:
            head_ids = torch.arange(heads.start, heads.stop, device=device)
            block_of, offset = (slots // page)[:, None], (slots % page)[:, None]
            self.index = ((block_of * spec.num_kv_heads + head_ids) * page + offset).reshape(-1)
        else:
            self.index = slots

    def gather(self, cache_layer: torch.Tensor, out: torch.Tensor) -> None:
        if self.hnd:
            rows = cache_layer.view(-1, self.dim)
        else:
            rows = cache_layer.view(cache_layer.shape[0] * cache_layer.shape[1], -1)[:, self.heads.start * self.dim : self.heads.stop * self.dim]
        torch.index_select(rows, 0, self.index, out=out.view(-1, self.width))



def slice_pair_buffers(kv: torch.Tensor, plan: TransferPlan) -> list[torch.Tensor]:
    """Prefill side from exported KV `[L, 2, T, H, D]`: the same buffers as `gather_pair_buffers`."""
    return [slice_pair_buffer(kv, plan, index) for index in range(len(plan.pairs))]


def pair_slab(kv: torch.Tensor, plan: TransferPlan, index: int) -> torch.Tensor | None:
    """Pair `index`'s buffer as a 1-D view of exported KV `[L, 2, T, H, D]` when it is one
    contiguous slab of it (one piece with every head of a run of layers), else None."""
    pair = plan.pairs[index]
    if len(pair.pieces) != 1:
        return None
    seg = pair.pieces[0].segment
    part = kv[seg.layer_start : seg.layer_stop, :, :, seg.head_start : seg.head_stop]
    return part.view(-1) if part.is_contiguous() else None


def slice_pair_buffer(kv: torch.Tensor, plan: TransferPlan, index: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pair `index`'s buffer from exported KV `[L, 2, T, H, D]`, 1-D in the source dtype.

    A pair that is one contiguous slab of `kv` (every head of a run of layers) comes back
    as a view, with no copy; otherwise it is copied into `out` (raw bytes or typed; e.g.
    from a staging pool) or a new buffer.
    """
    spec = plan.src_spec
    expected = (spec.num_layers, 2, kv.shape[2], spec.num_kv_heads, spec.head_dim)
    if kv.dim() != 5 or tuple(kv.shape) != expected or kv.dtype != spec.dtype:
        raise ValueError(f"KV {tuple(kv.shape)} {kv.dtype} does not match the source spec {expected} {spec.dtype}")
    slab = pair_slab(kv, plan, index)
    if slab is not None:
        return slab
    pair, num_tokens = plan.pairs[index], kv.shape[2]
    parts = [kv[p.segment.layer_start : p.segment.layer_stop, :, :, p.segment.head_start : p.segment.head_stop] for p in pair.pieces]
    if out is None:
        return parts[0].contiguous().view(-1) if len(parts) == 1 else torch.cat([part.reshape(-1) for part in parts])
    flat = typed_buffer(out, pair, plan, num_tokens)
    for piece, part in zip(pair.pieces, parts):
        piece_view(flat, piece, num_tokens).copy_(part)
    return flat
