"""Decoder side of the re-shard (the CPU torch path): pair buffers -> paged cache.

Head slicing/merging, page-size change, HND/NHD and the dtype cast in one pass. A
contiguous cache (the spec's own layouts: tests, `bench_reshard`) is filled layer by layer
through a `LayerImage` (the layer's pages in request order, small enough to stay in the CPU
caches): the head merge/split is a sequential strided copy into it, and the cache takes
whole pages (`PageMap`). A non-contiguous cache — what serving passes: the engine's
`[L, H, blocks, page, D]` cache seen as HND through `hnd_views()` — takes one strided copy
per run of consecutive blocks (`page_views`). Pieces that already are whole pages skip both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared.reshard.buffers import as_nhd, by_layer, check_buffers, check_cache, page_views, piece_heads, piece_view, typed_buffer
from shared.reshard.page_image import LayerImage, is_page_slab, write_piece
from shared.reshard.page_map import BlockTable, PageMap, block_list
from shared.transfer_plan import TransferPlan


def scatter_pair_buffers(
    buffers: Sequence[torch.Tensor],
    plan: TransferPlan,
    dst_key: torch.Tensor,
    dst_value: torch.Tensor,
    dst_block_table: BlockTable,
    num_tokens: int,
) -> None:
    """Decoder side (torch path): writes every pair buffer into the paged cache, casting to its dtype."""
    spec = plan.dst_spec
    check_cache(dst_key, dst_value, spec, "destination cache")
    check_buffers(buffers, plan)
    typed = [typed_buffer(b, pair, plan, num_tokens) for b, pair in zip(buffers, plan.pairs)]
    work = [(p, piece_view(b, p, num_tokens)) for b, pair in zip(typed, plan.pairs) for p in pair.pieces]
    if not (dst_key.is_contiguous() and dst_value.is_contiguous()):
        blocks = block_list(dst_block_table, num_tokens, spec.page_size)
        caches = (as_nhd(dst_key, spec), as_nhd(dst_value, spec))
        for piece, src in work:
            seg = piece.segment
            for kv, cache in enumerate(caches):
                region = cache[seg.layer_start : seg.layer_stop, :, :, seg.head_start : seg.head_stop]
                for pages, rows in page_views(region, src[:, kv], blocks, spec.page_size):
                    pages.copy_(rows)  # casts to the cache dtype
        return
    page_map = PageMap(dst_block_table, num_tokens, spec.page_size, dst_key.device)
    image: LayerImage | None = None
    for layer, here in by_layer(work):
        direct = all(src.dtype == spec.dtype and is_page_slab(spec, piece_heads(piece)) for piece, src in here)
        covered = _covers_allpiece_heads([piece_heads(piece) for piece, _ in here], spec.num_kv_heads)
        for kv, cache in enumerate((dst_key, dst_value)):
            if direct:
                for piece, src in here:
                    write_piece(src[layer - piece.segment.layer_start, kv], piece_heads(piece), cache[layer], spec, page_map)
                continue
            image = image or LayerImage.empty(spec, num_tokens, dst_key.device)
            if not covered:  # heads no piece brings keep what the cache holds
                image.read_from(cache[layer], page_map)
            for piece, src in here:
                image.fill(src[layer - piece.segment.layer_start, kv], piece_heads(piece))
            image.write_to(cache[layer], page_map)


def _covers_allpiece_heads(head_ranges: list[range], num_heads: int) -> bool:
    covered: set[int] = set()
    for heads in head_ranges:
        covered.update(heads)
    return len(covered) == num_heads


def pair_buffers_to_shards(
    buffers: Sequence[torch.Tensor], plan: TransferPlan, num_tokens: int
) -> dict[int, torch.Tensor]:
    """Each destination rank's shard `[its layers, 2, T, its heads, dim]` in the destination dtype."""
    check_buffers(buffers, plan)
    dst, spec = plan.dst_layout, plan.dst_spec
    shards: dict[int, torch.Tensor] = {}
    for buffer, pair in zip(buffers, plan.pairs):
        flat = typed_buffer(buffer, pair, plan, num_tokens)
        coord = dst.coord(pair.dst_rank)
        layers = dst.layers_of(coord.pp, spec.num_layers)
        heads = dst.kv_heads_of(coord.tp, spec.num_kv_heads)
        shard = shards.get(pair.dst_rank)
        if shard is None:
            shape = (len(layers), 2, num_tokens, len(heads), spec.head_dim)
            shard = shards[pair.dst_rank] = torch.empty(shape, dtype=spec.dtype, device=flat.device)
        for piece in pair.pieces:
            seg = piece.segment
            shard[
                seg.layer_start - layers.start : seg.layer_stop - layers.start,
                :,
                :,
                seg.head_start - heads.start : seg.head_stop - heads.start,
            ] = piece_view(flat, piece, num_tokens)
    return shards


# ---------------------------------------------------------------- oracle (token by token)
