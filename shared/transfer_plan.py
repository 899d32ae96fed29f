"""Which KV bytes go from which prefill rank to which decoder rank: a pure, cached plan.

For a (source layout, destination layout, KV specs, destination DP group) the plan lists
*segments* — `(src rank, dst rank, layers, heads)` rectangles — and groups them into one
*pair buffer* per (src rank, dst rank) pair that has data. A session sends exactly one
message per pair buffer.

Pair buffer content (the wire format), in the source dtype:

    for each piece (segments of the pair, ordered by layer then head):
        [layer][K/V][token][head][dim]      # piece layers x 2 x T x piece heads x head_dim

which is exactly `kv[l0:l1, :, :, h0:h1, :]` of the engine's exported `[L, 2, T, H, D]`
KV, so building a pair buffer is one gather. With the layer split and head split of
`shared.layouts` every pair needs a single rectangle, so a pair buffer has one piece;
the format allows several.

Replicated heads: when the source tp exceeds the KV heads, only the lowest tp rank that
holds a head sends it. When the destination replicates a head, every destination rank
holding it receives its own copy (each real GPU needs the bytes in its own memory).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from shared.kv_spec import KvSpec, check_compatible
from shared.layouts import Layout, LayoutError, validate


@dataclass(frozen=True)
class Segment:
    """A rectangle of KV: layers [layer_start, layer_stop) x heads [head_start, head_stop)."""

    src_rank: int
    dst_rank: int
    layer_start: int
    layer_stop: int
    head_start: int
    head_stop: int

    @property
    def num_layers(self) -> int:
        return self.layer_stop - self.layer_start

    @property
    def num_heads(self) -> int:
        return self.head_stop - self.head_start


@dataclass(frozen=True)
class Piece:
    """A segment's place inside its pair buffer; offsets and sizes count elements per token."""

    segment: Segment
    offset_per_token: int
    elems_per_token: int

    def offset(self, num_tokens: int) -> int:
        """Element offset of this piece inside the pair buffer of a `num_tokens` session."""
        return self.offset_per_token * num_tokens


@dataclass(frozen=True)
class PairPlan:
    """Everything one source rank sends one destination rank: one contiguous buffer."""

    src_rank: int
    dst_rank: int
    pieces: tuple[Piece, ...]
    elems_per_token: int

    def numel(self, num_tokens: int) -> int:
        return self.elems_per_token * num_tokens


@dataclass(frozen=True)
class TransferPlan:
    src_layout: Layout
    dst_layout: Layout
    src_spec: KvSpec
    dst_spec: KvSpec
    dst_dp_group: int
    pairs: tuple[PairPlan, ...]  # sorted by (src_rank, dst_rank)

    @property
    def segments(self) -> list[Segment]:
        return [piece.segment for pair in self.pairs for piece in pair.pieces]

    @property
    def wire_itemsize(self) -> int:
        """Pair buffers travel in the source dtype; the decoder casts while scattering."""
        return self.src_spec.itemsize

    @property
    def bytes_per_token(self) -> int:
        return sum(pair.elems_per_token for pair in self.pairs) * self.wire_itemsize

    def pair_nbytes(self, pair: PairPlan, num_tokens: int) -> int:
        return pair.numel(num_tokens) * self.wire_itemsize

    def nbytes(self, num_tokens: int) -> int:
        return self.bytes_per_token * num_tokens

    def summary(self) -> str:
        kv_bytes = self.src_spec.bytes_per_token
        return (
            f"KV transfer {self.src_layout.kind} {self.src_layout.describe()} -> "
            f"{self.dst_layout.kind} {self.dst_layout.describe()} (dp group {self.dst_dp_group}): "
            f"{len(self.pairs)} rank pairs, {len(self.segments)} segments, "
            f"{self.bytes_per_token} bytes/token on the wire ({self.bytes_per_token / kv_bytes:.2f}x the KV)"
        )


def _overlap(a: range, b: range) -> tuple[int, int] | None:
    start, stop = max(a.start, b.start), min(a.stop, b.stop)
    return (start, stop) if start < stop else None


def _sent_heads(layout: Layout, tp_rank: int, num_kv_heads: int) -> range:
    """Heads this source tp rank sends: those it holds as the lowest replica."""
    heads = layout.kv_heads_of(tp_rank, num_kv_heads)
    return heads if layout.primary_tp_rank(heads.start, num_kv_heads) == tp_rank else range(0)


@functools.lru_cache(maxsize=256)
def plan_transfer(
    src_layout: Layout, dst_layout: Layout, src_spec: KvSpec, dst_spec: KvSpec, dst_dp_group: int = 0
) -> TransferPlan:
    """The segments and pair buffers moving one request's KV into DP group `dst_dp_group`.

    Raises `LayoutError` for a layout impossible for the model and `IncompatibleKvError`
    when the specs cannot hand off (naming the field).
    """
    check_compatible(src_spec, dst_spec)
    validate(src_layout, src_spec)
    validate(dst_layout, dst_spec)
    if not 0 <= dst_dp_group < dst_layout.dp:
        raise LayoutError(f"destination dp group {dst_dp_group} outside dp={dst_layout.dp}; valid: 0..{dst_layout.dp - 1}")
    layers, heads, dim = src_spec.num_layers, src_spec.num_kv_heads, src_spec.head_dim
    segments: dict[tuple[int, int], list[Segment]] = {}
    for src_stage in range(src_layout.pp):
        for dst_stage in range(dst_layout.pp):
            layer_span = _overlap(src_layout.layers_of(src_stage, layers), dst_layout.layers_of(dst_stage, layers))
            if layer_span is None:
                continue
            for src_tp in range(src_layout.tp):
                sent = _sent_heads(src_layout, src_tp, heads)
                for dst_tp in range(dst_layout.tp):
                    head_span = _overlap(sent, dst_layout.kv_heads_of(dst_tp, heads))
                    if head_span is None:
                        continue
                    src_rank = src_layout.rank(0, src_stage, src_tp)
                    dst_rank = dst_layout.rank(dst_dp_group, dst_stage, dst_tp)
                    segment = Segment(src_rank, dst_rank, *layer_span, *head_span)
                    segments.setdefault((src_rank, dst_rank), []).append(segment)
    pairs = []
    for (src_rank, dst_rank), pair_segments in sorted(segments.items()):
        pieces, offset = [], 0
        for segment in sorted(pair_segments, key=lambda s: (s.layer_start, s.head_start)):
            elems = segment.num_layers * 2 * segment.num_heads * dim
            pieces.append(Piece(segment, offset, elems))
            offset += elems
        pairs.append(PairPlan(src_rank, dst_rank, tuple(pieces), offset))
    return TransferPlan(src_layout, dst_layout, src_spec, dst_spec, dst_dp_group, tuple(pairs))
