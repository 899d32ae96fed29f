"""Pair buffers and paged caches: the views and checks the re-shard's gather and scatter share.

Paged caches hold K (or V) for every local layer, in the spec's memory layout:
NHD `[layers, blocks, page, heads, dim]` or HND `[layers, blocks, heads, page, dim]`.
A request's token `p` lives in page `block_table[p // page]` at offset `p % page`. A pair
buffer is laid out as `shared.transfer_plan` says: per piece `[layers][K/V][token][head][dim]`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from shared.kv_spec import KvSpec
from shared.reshard.page_map import BlockTable, block_list  # noqa: F401  (BlockTable: re-exported)
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


def layer_major(plan_pieces: list[tuple[Piece, torch.Tensor]]) -> list[int]:
    """Layers touched by any piece, ascending."""
    layers: set[int] = set()
    for piece, _ in plan_pieces:
        layers.update(range(piece.segment.layer_start, piece.segment.layer_stop))
    return sorted(layers)


def as_nhd(cache: torch.Tensor, spec: KvSpec) -> torch.Tensor:
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


def check_buffers(buffers: Sequence[torch.Tensor], plan: TransferPlan) -> None:
    if len(buffers) != len(plan.pairs):
        raise ValueError(f"{len(buffers)} pair buffers for a plan of {len(plan.pairs)} pairs")



def piece_heads(piece: Piece) -> range:
    return range(piece.segment.head_start, piece.segment.head_stop)


def by_layer(work: list[tuple[Piece, torch.Tensor]]) -> list[tuple[int, list[tuple[Piece, torch.Tensor]]]]:
    """Per layer touched, ascending: its pieces in plan order (so where pieces overlap, as
    replicated heads do, the later one wins, as in a piece-by-piece copy)."""
    return [
        (layer, [(p, rows) for p, rows in work if p.segment.layer_start <= layer < p.segment.layer_stop])
        for layer in layer_major(work)
    ]
