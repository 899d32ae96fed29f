"""Qwen3-MoE's sparse MLP: a softmax router picks top-k experts per token, each a SwiGLU MLP.

Expert parallelism (`ep`): expert e lives on EP rank `e // (num_experts // ep)`, contiguous
runs as in vLLM/SGLang's default placement. Ranks are virtual here (one process computes
every expert), but the forward runs as an EP deployment would: *dispatch* each (token, k)
assignment to the rank holding its expert, each rank runs its own experts, *combine*
gathers the outputs back into [T, k] slots and takes the router-weighted sum. Every slot
is computed by exactly one expert on the same rows whatever `ep` is, and the sum runs over
k in a fixed order, so results are bit-identical for every `ep`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.engine.config import ModelConfig


@dataclass(frozen=True)
class ExpertPlacement:
    """Which EP rank holds each expert: `experts_per_rank` consecutive experts per rank."""

    num_experts: int
    ep: int

    def __post_init__(self) -> None:
        if self.ep <= 0 or self.num_experts <= 0 or self.num_experts % self.ep:
            valid = [e for e in range(1, self.num_experts + 1) if self.num_experts % e == 0]
            raise ValueError(f"ep={self.ep} must divide the {self.num_experts} experts; valid ep: {valid}")

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep

    def rank_of(self, expert: int) -> int:
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} outside [0, {self.num_experts})")
        return expert // self.experts_per_rank

    def experts_of(self, rank: int) -> range:
        if not 0 <= rank < self.ep:
            raise IndexError(f"EP rank {rank} outside [0, {self.ep})")
        return range(rank * self.experts_per_rank, (rank + 1) * self.experts_per_rank)

    @property
    def expert_ranks(self) -> tuple[int, ...]:
        """The rank of every expert, indexed by expert id."""
        return tuple(self.rank_of(e) for e in range(self.num_experts))


class SparseMoeBlock(nn.Module):
    """Router + stacked expert weights (`[E, out, in]`, like nn.Linear per expert)."""

    def __init__(self, config: ModelConfig, ep: int = 1):
        super().__init__()
        num_experts, hidden, inner = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inner))
        self.placement = ExpertPlacement(num_experts, ep)

    @property
    def num_experts(self) -> int:
        return self.placement.num_experts

    def expert_ranks(self, ep: int) -> tuple[int, ...]:
        """The EP rank of every expert under `ep` (what a multi-GPU deployment would load where)."""
        return ExpertPlacement(self.num_experts, ep).expert_ranks

    def set_ep(self, ep: int) -> None:
        self.placement = ExpertPlacement(self.num_experts, ep)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> weights [T, k] (x's dtype), expert ids [T, k] int64."""
        probs = F.softmax(self.router(x).float(), dim=-1)  # [T, E], float32 like HF
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]
        weights, experts = self.route(x)
        assignments = dispatch(experts.reshape(-1), self.num_experts)  # per expert: flat (token, k) indices
        slots = x.new_empty(experts.numel(), x.shape[-1])  # [T * k, hidden]: one row per assignment
        for rank in range(self.placement.ep):
            for expert in self.placement.experts_of(rank):
                index = assignments[expert]
                if index.numel():
                    slots[index] = self._expert(expert, x[index // self.top_k])
        combined = slots.view(*experts.shape, -1) * weights[..., None]  # [T, k, hidden]
        return combined.sum(dim=1)

    def _expert(self, expert: int, h: torch.Tensor) -> torch.Tensor:
        # h: [n, hidden] -> [n, hidden], SwiGLU
        return F.linear(F.silu(F.linear(h, self.gate_proj[expert])) * F.linear(h, self.up_proj[expert]), self.down_proj[expert])


def dispatch(flat_experts: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """Assignment indices (into the flattened [T, k] choices) grouped by expert, in token order."""
    # flat_experts: [T * k] int64
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
    return list(order.split(counts))
