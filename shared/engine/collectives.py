"""The collectives one rank's forward pass takes part in (torch.distributed), and what they cost.

- tensor parallel: all-reduce after o_proj and down_proj and after the vocab-parallel
  embedding; gather of the vocab-parallel logits to the slice-0 rank of the last stage;
- experts: all-reduce over the stage's ranks (every rank adds its experts' share), with the
  DP groups' tokens gathered first when attention is data-parallel;
- pipeline: activations to the next stage, logits from the last stage to rank 0.
A one-rank world has none of them (`LOCAL`), so the same model code runs alone.

Every call is timed (`seconds` by kind), so benchmarks can report the collectives' share of a step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shared.engine.shard import WHOLE, ModelShard


@dataclass
class Collectives:
    shard: ModelShard = WHOLE
    tp_group: object | None = None  # ProcessGroup of this rank's tensor slice ranks (same dp group and stage)
    stage_group: object | None = None  # every rank of this pipeline stage (the expert-parallel group)
    dp_group: object | None = None  # same stage and tensor slice, every DP group
    tp_ranks: tuple[int, ...] = (0,)  # global ranks of the tp group, slice order
    dp_ranks: tuple[int, ...] = (0,)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def __deepcopy__(self, memo: dict) -> Collectives:
        return self  # model twins (prepack.py) share the rank's process groups

    def timed(self, kind: str, started: float) -> None:
        """Counts one call of `kind` that began at `started` (perf_counter) in the step's breakdown."""
        self.seconds[kind] += time.perf_counter() - started
        self.calls[kind] += 1

    # -- tensor parallel -------------------------------------------------------------------

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tensor-parallel slices, in place."""
        if self.shard.tp == 1:
            return x
        started = time.perf_counter()
        dist.all_reduce(x, group=self.tp_group)
        self.timed("tp_all_reduce", started)
        return x

    def tp_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Slices' `x` concatenated along the last dim, on tensor slice 0; None on the others."""
        if self.shard.tp == 1:
            return x
        started = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.shard.tp)] if self.shard.tp_rank == 0 else None
        dist.gather(x, parts, dst=self.tp_ranks[0], group=self.tp_group)
        self.timed("tp_gather", started)
        return torch.cat(parts, dim=-1) if parts is not None else None

    # -- experts ---------------------------------------------------------------------------

    def stage_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over every rank of this pipeline stage (the expert-parallel group), in place."""
        if self.shard.dp * self.shard.tp == 1:
            return x
        started = time.perf_counter()
        dist.all_reduce(x, group=self.stage_group)
        self.timed("moe_all_reduce", started)
        return x

    def dp_all_gather(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every DP group's rows (group d has `counts[d]`), concatenated in DP order."""
        if self.shard.dp == 1:
            return x
        started = time.perf_counter()
        width = max(max(counts), 1)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=self.dp_group)
        self.timed("moe_all_gather", started)
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    # -- pipeline --------------------------------------------------------------------------

    def send(self, x: torch.Tensor, dst: int):
        """Starts sending `x` to global rank `dst`; wait on the returned work before reusing `x`."""
        return dist.isend(x.contiguous(), dst)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        started = time.perf_counter()
        out = torch.empty(shape, dtype=dtype)
        dist.recv(out, src)
        self.timed("pp_recv", started)
        return out


LOCAL = Collectives()


def build_collectives(shard: ModelShard) -> Collectives:
    """Creates this rank's process groups. Every rank of the world must call it (the same groups, in the same order)."""
    if shard.world == 1:
        return LOCAL
    tp_group = stage_group = dp_group = None
    tp_ranks: tuple[int, ...] = ()
    dp_ranks: tuple[int, ...] = ()

    def rank_of(d: int, p: int, t: int) -> int:
        return (d * shard.pp + p) * shard.tp + t

    me = shard.coord
    for d in range(shard.dp):
        for p in range(shard.pp):
            ranks = [rank_of(d, p, t) for t in range(shard.tp)]
            group = dist.new_group(ranks)
            if (d, p) == (me.dp, me.pp):
                tp_group, tp_ranks = group, tuple(ranks)
    for p in range(shard.pp):
        group = dist.new_group([rank_of(d, p, t) for d in range(shard.dp) for t in range(shard.tp)])
        if p == me.pp:
            stage_group = group
    for p in range(shard.pp):
        for t in range(shard.tp):
            ranks = [rank_of(d, p, t) for d in range(shard.dp)]
            group = dist.new_group(ranks)
            if (p, t) == (me.pp, me.tp):
                dp_group, dp_ranks = group, tuple(ranks)
    return Collectives(shard, tp_group, stage_group, dp_group, tp_ranks, dp_ranks)
