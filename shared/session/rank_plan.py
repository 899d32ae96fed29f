"""One rank's part of a transfer plan, in that rank's own coordinates.

A real rank holds only its shard: the layers of its pipeline stage and the KV heads of its
tensor slice, numbered from 0 in its cache and in the KV it exports. The plan
(`shared.transfer_plan`) speaks in global layers and heads; a rank view keeps the pairs
that rank sends (source side) or receives (destination side) and shifts their segments to
local numbers, so the gather and scatter of `shared.reshard` run unchanged on the rank's
own tensors. Pair buffers keep their wire layout: only where pieces come from or go to moves.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from shared.kv_spec import KvSpec
from shared.layouts import Layout
from shared.transfer_plan import PairPlan, Piece, Segment, TransferPlan

Side = Literal["src", "dst"]


@dataclasses.dataclass(frozen=True)
class RankShard:
    """The layers and KV heads one rank of a layout holds (global numbers)."""

    layers: range
    heads: range

    @classmethod
    def of(cls, layout: Layout, rank: int, spec: KvSpec) -> RankShard:
        coord = layout.coord(rank)
        return cls(layout.layers_of(coord.pp, spec.num_layers), layout.kv_heads_of(coord.tp, spec.num_kv_heads))

    def local_spec(self, spec: KvSpec, tp: int) -> KvSpec:
        """The spec of this rank's own cache: its layers and heads only."""
        return dataclasses.replace(
            spec, num_layers=len(self.layers), num_kv_heads=len(self.heads), num_q_heads=spec.num_q_heads // tp
        )

    def localise(self, segment: Segment) -> Segment:
        return dataclasses.replace(
            segment,
            layer_start=segment.layer_start - self.layers.start,
            layer_stop=segment.layer_stop - self.layers.start,
            head_start=segment.head_start - self.heads.start,
            head_stop=segment.head_stop - self.heads.start,
        )


@functools.lru_cache(maxsize=1024)
def rank_view(plan: TransferPlan, side: Side, rank: int) -> TransferPlan:
    """The pairs `rank` sends (side "src") or receives ("dst"), with segments in its local numbers."""
    layout, spec = (plan.src_layout, plan.src_spec) if side == "src" else (plan.dst_layout, plan.dst_spec)
    shard = RankShard.of(layout, rank, spec)
    mine = [pair for pair in plan.pairs if (pair.src_rank if side == "src" else pair.dst_rank) == rank]
    pairs = tuple(
        PairPlan(
            pair.src_rank,
            pair.dst_rank,
            tuple(Piece(shard.localise(piece.segment), piece.offset_per_token, piece.elems_per_token) for piece in pair.pieces),
            pair.elems_per_token,
        )
        for pair in mine
    )
    local = shard.local_spec(spec, layout.tp)
    specs = {"src_spec": local} if side == "src" else {"dst_spec": local}
    return dataclasses.replace(plan, pairs=pairs, **specs)
