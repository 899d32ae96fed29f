"""Which part of the model one rank holds: its layers, heads, MLP columns, vocabulary rows and experts.

A worker instance of layout (dp, tp, pp, ep) is `dp * tp * pp` ranks (shared/layouts.py
numbers them). Rank (d, p, t) holds:

- layers: pipeline stage p's run of layers (`Layout.layers_of`);
- attention: query heads `[t * Hq/tp, (t+1) * Hq/tp)` and the KV heads of tensor slice t
  (`Layout.kv_heads_of`; a KV head is replicated on several ranks when tp > KV heads);
  q/k/v are split by rows, o_proj by columns, and the o_proj outputs are summed (all-reduce);
- dense MLP: a slice of the intermediate columns (gate/up rows, down columns), summed after
  down_proj; the slices may be uneven, so any tp works for any intermediate size;
- vocabulary: embedding and LM head are vocab-parallel: rows `[t * Vr, (t+1) * Vr)` with
  `Vr = ceil(V / tp)` (the last slice zero-padded); the embedding lookups are summed, the
  head's logits gathered. Chosen over replication so that no rank holds a full copy of the
  largest matrices (SmolLM2's embedding is 21% of its weights); only the first stage embeds
  and only the last stage computes logits;
- experts (MoE layers): the stage's `dp * tp` ranks form its expert-parallel group; expert
  `e` lives on EP rank `e // (E / ep)`, and the `dp * tp / ep` ranks of one EP rank split
  each of its experts' intermediate columns the way a dense MLP does.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.engine.config import ModelConfig
from shared.layouts import RankCoord


def even_split(n: int, parts: int, index: int) -> range:
    """Part `index` of `n` items in `parts` contiguous runs, the first `n % parts` one longer."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


@dataclass(frozen=True)
class ModelShard:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        world = self.dp * self.tp * self.pp
        if not 0 <= self.rank < world:
            raise ValueError(f"rank {self.rank} outside a world of {world}")
        if (self.dp * self.tp) % self.ep:
            raise ValueError(f"ep={self.ep} must divide the dp*tp={self.dp * self.tp} ranks of a pipeline stage")

    @classmethod
    def of(cls, layout, rank: int) -> ModelShard:
        """Rank `rank` of a `shared.layouts` layout."""
        return cls(layout.dp, layout.tp, layout.pp, layout.ep, rank)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def coord(self) -> RankCoord:
        group, t = divmod(self.rank, self.tp)
        d, p = divmod(group, self.pp)
        return RankCoord(d, p, t)

    @property
    def tp_rank(self) -> int:
        return self.coord.tp

    @property
    def stage(self) -> int:
        return self.coord.pp

    @property
    def dp_group(self) -> int:
        return self.coord.dp

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def is_whole(self) -> bool:
        return self.world == 1

    # -- attention and dense MLP -----------------------------------------------------------

    def layers(self, config: ModelConfig) -> range:
        return even_split(config.num_layers, self.pp, self.stage)

    def q_heads(self, config: ModelConfig) -> range:
        per_rank = config.num_heads // self.tp
        return range(self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank)

    def kv_heads(self, config: ModelConfig) -> range:
        heads = config.num_kv_heads
        if self.tp <= heads:
            per_rank = heads // self.tp
            return range(self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank)
        head = self.tp_rank // (self.tp // heads)
        return range(head, head + 1)

    def columns(self, size: int) -> range:
        """This rank's slice of a dense MLP's intermediate size."""
        return even_split(size, self.tp, self.tp_rank)

    def check(self, config: ModelConfig) -> None:
        """Raises ValueError when the model cannot be split this way (the layout check names the same)."""
        if config.num_heads % self.tp:
            raise ValueError(f"tp={self.tp} does not divide the {config.num_heads} query heads")
        heads = config.num_kv_heads
        if (heads % self.tp) if self.tp <= heads else (self.tp % heads):
            raise ValueError(f"tp={self.tp} neither divides nor is a multiple of the {heads} KV heads")
        if self.pp > config.num_layers:
            raise ValueError(f"pp={self.pp} exceeds the {config.num_layers} layers")
        if self.ep > 1 and config.num_experts % self.ep:
            raise ValueError(f"ep={self.ep} does not divide the {config.num_experts} experts")

    # -- vocabulary ------------------------------------------------------------------------

    def vocab_rows_per_rank(self, config: ModelConfig) -> int:
        return -(-config.vocab_size // self.tp)

    def vocab(self, config: ModelConfig) -> range:
        """Real vocabulary rows of this rank (its padded shard may hold fewer real rows)."""
        per_rank = self.vocab_rows_per_rank(config)
        start = min(self.tp_rank * per_rank, config.vocab_size)
        return range(start, min(start + per_rank, config.vocab_size))

    # -- experts ---------------------------------------------------------------------------

    @property
    def stage_index(self) -> int:
        """This rank's place among the dp*tp ranks of its pipeline stage (its expert-parallel group)."""
        coord = self.coord
        return coord.dp * self.tp + coord.tp

    @property
    def expert_replicas(self) -> int:
        """Ranks that hold the same experts (and split their intermediate columns)."""
        return self.dp * self.tp // self.ep

    @property
    def ep_rank(self) -> int:
        return self.stage_index // self.expert_replicas

    def experts(self, config: ModelConfig) -> range:
        per_rank = config.num_experts // self.ep
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def expert_columns(self, config: ModelConfig) -> range:
        return even_split(config.moe_intermediate_size, self.expert_replicas, self.stage_index % self.expert_replicas)


WHOLE = ModelShard()
