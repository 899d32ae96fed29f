"""KV re-shard in plain torch: the prefill-side gather, the decoder-side scatter, and the oracle.

Paged caches hold K (or V) for every layer, in the spec's memory layout:
NHD `[layers, blocks, page, heads, dim]` or HND `[layers, blocks, heads, page, dim]`.
Ranks are virtual, so one cache tensor holds every rank's shard; a rank's shard is its
layers x heads sub-block of it. A request's token `p` lives in page
`block_table[p // page]` at offset `p % page`.

- `gather_pair_buffers` (prefill side): one contiguous buffer per (src rank, dst rank)
  pair, in the wire order of `shared.transfer_plan` (`[layer][K/V][token][head][dim]`).
- `scatter_pair_buffers` (decoder side, the CPU torch path): buffers -> paged cache,
  handling head slicing/merging, page-size change, HND/NHD and dtype cast.
  A contiguous cache (the spec's own layouts: tests, `bench_reshard`) is filled layer by
  layer through a `LayerImage` (the layer's pages in request order, small enough to stay
  in the CPU caches): the head merge/split is a sequential strided copy into it, and the
  cache takes whole pages (`PageMap`). A non-contiguous cache — what serving passes: the
  engine's `[L, H, blocks, page, D]` cache seen as HND through `hnd_views()` — takes one
  strided copy per run of consecutive blocks (`page_views`). The gather from a paged
  cache is one `index_select` of token rows per layer and K/V (`_SlotRows`); serving
  pushes the exported dense KV instead. Pieces that already are whole pages skip both.
- `reference_reshard` / `reference_shards`: obviously-correct token-by-token versions,
  the oracle for tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from kernels.page_image import LayerImage, is_page_slab, read_piece, write_piece
from kernels.page_map import BlockTable, PageMap, block_list, pages_needed  # noqa: F401  (BlockTable, pages_needed: re-exported)
from shared.kv_spec import KvSpec
from shared.layouts import Layout
from shared.transfer_plan import PairPlan, Piece, TransferPlan


def check_cache(key: torch.Tensor, value: torch.Tensor, spec: KvSpec, what: str) -> None:
    """Raises ValueError unless K and V are paged caches of `spec` (shape, layout, dtype)."""
    if key.shape != value.shape or key.dtype != value.dtype or key.device != value.device:
        raise ValueError(f"{what}: K {tuple(key.shape)} {key.dtype} and V {tuple(value.shape)} {value.dtype} differ")
    if key.dim() != 5 or tuple(key.shape) != spec.cache_shape(key.shape[1]):
        raise ValueError(f"{what}: cache shape {tuple(key.shape)} is not {spec.memory_layout} {spec.cache_shape(key.shape[1] if key.dim() == 5 else 0)}")
    if key.dtype != spec.dtype:
        raise ValueError(f"{what}: cache dtype {key.dtype} differs from the spec's {spec.dtype}")


def page_ids(block_table: BlockTable, num_tokens: int, page_size: int, device: torch.device) -> torch.Tensor:
    """The int64 page ids holding tokens [0, num_tokens), on `device`."""
    return torch.tensor(block_list(block_table, num_tokens, page_size), dtype=torch.long, device=device)


def page_views(
    region: torch.Tensor, rows: torch.Tensor, blocks: list[int], page_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching (cache pages, token rows) views, one per run of consecutive block ids.

    `region`: `[layers, blocks, page, heads, dim]` (a view of a paged cache);
    `rows`: `[layers, T, heads, dim]` token-major. A run of consecutive blocks is one
    strided copy: the path for caches that are not contiguous (contiguous ones move whole
    pages through a `LayerImage`).
    """
    num_tokens = rows.shape[1]
    start = 0
    while start < len(blocks):
        stop = start + 1
        while stop < len(blocks) and blocks[stop] == blocks[stop - 1] + 1:
            stop += 1
        first_token = start * page_size
        full = min(stop - start, (num_tokens - first_token) // page_size)
        if full:
            tokens = rows[:, first_token : first_token + full * page_size].unflatten(1, (full, page_size))
            yield region[:, blocks[start] : blocks[start] + full], tokens
        tail = min(num_tokens - first_token - full * page_size, page_size)
        if full < stop - start and tail > 0:  # the request's last, partly filled page
            tail_start = first_token + full * page_size
            yield region[:, blocks[start] + full, :tail], rows[:, tail_start : tail_start + tail]
        start = stop


def _layer_major(plan_pieces: list[tuple[Piece, torch.Tensor]]) -> list[int]:
    """Layers touched by any piece, ascending."""
    layers: set[int] = set()
    for piece, _ in plan_pieces:
        layers.update(range(piece.segment.layer_start, piece.segment.layer_stop))
    return sorted(layers)


def _as_nhd(cache: torch.Tensor, spec: KvSpec) -> torch.Tensor:
    # cache in the spec's layout -> a view [layers, blocks, page, heads, dim]
    return cache if spec.memory_layout == "NHD" else cache.transpose(2, 3)


def piece_view(buffer: torch.Tensor, piece: Piece, num_tokens: int) -> torch.Tensor:
    """The `[layers, 2, T, heads, dim]` view of one piece inside a typed pair buffer."""
    seg = piece.segment
    start = piece.offset(num_tokens)
    flat = buffer[start : start + piece.elems_per_token * num_tokens]
    return flat.view(seg.num_layers, 2, num_tokens, seg.num_heads, -1)


def typed_buffer(buffer: torch.Tensor, pair: PairPlan, plan: TransferPlan, num_tokens: int) -> torch.Tensor:
    """A received pair buffer (raw uint8 or already typed) as a 1-D tensor of the wire dtype."""
    wire_dtype = plan.src_spec.dtype
    flat = buffer.reshape(-1)
    if flat.dtype not in (wire_dtype, torch.uint8):
        raise ValueError(f"pair buffer dtype {flat.dtype}: expected uint8 or {wire_dtype}")
    nbytes, expected = flat.numel() * flat.element_size(), plan.pair_nbytes(pair, num_tokens)
    if nbytes != expected:
        raise ValueError(
            f"pair buffer {pair.src_rank}->{pair.dst_rank} holds {nbytes} bytes; {num_tokens} tokens need {expected}"
        )
    return flat.view(wire_dtype)


def _check_buffers(buffers: Sequence[torch.Tensor], plan: TransferPlan) -> None:
    if len(buffers) != len(plan.pairs):
        raise ValueError(f"{len(buffers)} pair buffers for a plan of {len(plan.pairs)} pairs")


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
        caches = (_as_nhd(src_key, spec), _as_nhd(src_value, spec))
        for piece, piece_rows in work:
            seg = piece.segment
            for kv, cache in enumerate(caches):
                region = cache[seg.layer_start : seg.layer_stop, :, :, seg.head_start : seg.head_stop]
                for pages, rows in page_views(region, piece_rows[:, kv], blocks, spec.page_size):
                    rows.copy_(pages)
        return buffers
    page_map = PageMap(block_table, num_tokens, spec.page_size, src_key.device)
    slot_rows: dict[range, _SlotRows] = {}
    for layer, here in _by_layer(work):
        for kv, cache in enumerate((src_key, src_value)):
            for piece, piece_rows in here:
                heads, rows = _heads(piece), piece_rows[layer - piece.segment.layer_start, kv]
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


def _heads(piece: Piece) -> range:
    return range(piece.segment.head_start, piece.segment.head_stop)


def _by_layer(work: list[tuple[Piece, torch.Tensor]]) -> list[tuple[int, list[tuple[Piece, torch.Tensor]]]]:
    """Per layer touched, ascending: its pieces in plan order (so where pieces overlap, as
    replicated heads do, the later one wins, as in a piece-by-piece copy)."""
    return [
        (layer, [(p, rows) for p, rows in work if p.segment.layer_start <= layer < p.segment.layer_stop])
        for layer in _layer_major(work)
    ]


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
    _check_buffers(buffers, plan)
    typed = [typed_buffer(b, pair, plan, num_tokens) for b, pair in zip(buffers, plan.pairs)]
    work = [(p, piece_view(b, p, num_tokens)) for b, pair in zip(typed, plan.pairs) for p in pair.pieces]
    if not (dst_key.is_contiguous() and dst_value.is_contiguous()):
        blocks = block_list(dst_block_table, num_tokens, spec.page_size)
        caches = (_as_nhd(dst_key, spec), _as_nhd(dst_value, spec))
        for piece, src in work:
            seg = piece.segment
            for kv, cache in enumerate(caches):
                region = cache[seg.layer_start : seg.layer_stop, :, :, seg.head_start : seg.head_stop]
                for pages, rows in page_views(region, src[:, kv], blocks, spec.page_size):
                    pages.copy_(rows)  # casts to the cache dtype
        return
    page_map = PageMap(dst_block_table, num_tokens, spec.page_size, dst_key.device)
    image: LayerImage | None = None
    for layer, here in _by_layer(work):
        direct = all(src.dtype == spec.dtype and is_page_slab(spec, _heads(piece)) for piece, src in here)
        covered = _covers_all_heads([_heads(piece) for piece, _ in here], spec.num_kv_heads)
        for kv, cache in enumerate((dst_key, dst_value)):
            if direct:
                for piece, src in here:
                    write_piece(src[layer - piece.segment.layer_start, kv], _heads(piece), cache[layer], spec, page_map)
                continue
            image = image or LayerImage.empty(spec, num_tokens, dst_key.device)
            if not covered:  # heads no piece brings keep what the cache holds
                image.read_from(cache[layer], page_map)
            for piece, src in here:
                image.fill(src[layer - piece.segment.layer_start, kv], _heads(piece))
            image.write_to(cache[layer], page_map)


def _covers_all_heads(head_ranges: list[range], num_heads: int) -> bool:
    covered: set[int] = set()
    for heads in head_ranges:
        covered.update(heads)
    return len(covered) == num_heads


def pair_buffers_to_shards(
    buffers: Sequence[torch.Tensor], plan: TransferPlan, num_tokens: int
) -> dict[int, torch.Tensor]:
    """Each destination rank's shard `[its layers, 2, T, its heads, dim]` in the destination dtype."""
    _check_buffers(buffers, plan)
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


def write_dense(kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: KvSpec, block_table: BlockTable) -> None:
    """Writes KV `[L, 2, T, H, D]` token by token into a paged cache of `spec`, casting to its dtype."""
    page = spec.page_size
    for pos in range(kv.shape[2]):
        block, offset = int(block_table[pos // page]), pos % page
        for which, cache in ((0, key), (1, value)):
            rows = kv[:, which, pos].to(spec.dtype)  # [L, H, D]
            if spec.memory_layout == "NHD":
                cache[:, block, offset, :, :] = rows
            else:
                cache[:, block, :, offset, :] = rows


def read_dense(key: torch.Tensor, value: torch.Tensor, spec: KvSpec, block_table: BlockTable, num_tokens: int) -> torch.Tensor:
    """Token-by-token inverse of `write_dense`: `[L, 2, T, H, D]` in the cache dtype."""
    page = spec.page_size
    out = torch.empty((spec.num_layers, 2, num_tokens, spec.num_kv_heads, spec.head_dim), dtype=key.dtype)
    for pos in range(num_tokens):
        block, offset = int(block_table[pos // page]), pos % page
        for which, cache in ((0, key), (1, value)):
            if spec.memory_layout == "NHD":
                out[:, which, pos] = cache[:, block, offset, :, :]
            else:
                out[:, which, pos] = cache[:, block, :, offset, :]
    return out


def reference_reshard(
    kv: torch.Tensor, dst_spec: KvSpec, dst_key: torch.Tensor, dst_value: torch.Tensor, dst_block_table: BlockTable
) -> None:
    """The oracle: the decoder's DP group holds every layer and head, so the re-sharded cache
    is simply the dense KV written token by token into its pages (cast to its dtype)."""
    check_cache(dst_key, dst_value, dst_spec, "destination cache")
    write_dense(kv, dst_key, dst_value, dst_spec, dst_block_table)


def reference_shards(kv: torch.Tensor, dst_layout: Layout, dst_spec: KvSpec, dst_dp_group: int = 0) -> dict[int, torch.Tensor]:
    """The oracle per rank: what each rank of the DP group holds, straight from the layout rules."""
    shards = {}
    for rank in dst_layout.group_ranks(dst_dp_group):
        coord = dst_layout.coord(rank)
        layers = dst_layout.layers_of(coord.pp, dst_spec.num_layers)
        heads = dst_layout.kv_heads_of(coord.tp, dst_spec.num_kv_heads)
        shards[rank] = kv[layers.start : layers.stop, :, :, heads.start : heads.stop].to(dst_spec.dtype)
    return shards
