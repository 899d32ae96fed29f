"""Qwen3-MoE's sparse MLP: a softmax router picks top-k experts per token, each a SwiGLU MLP.

Expert parallelism across real ranks (shared/engine/shard.py): the ranks of a pipeline
stage form the expert-parallel group; each holds the experts of its EP rank only (loaded
alone), and the ranks sharing an EP rank split those experts' intermediate columns. One
MoE layer, on every rank of the stage:

  1. the tokens: a rank's own batch; with data-parallel attention (dp > 1) every DP
     group's tokens are gathered first (`dp_all_gather`), so all ranks see the same rows;
  2. the router runs everywhere (replicated, a few KB) and picks top-k experts per token;
  3. each rank runs its own experts on the rows routed to them and adds the router-weighted
     outputs into a `[T, hidden]` partial sum, in expert order (as HF does);
  4. the partial sums are added over the stage (`stage_all_reduce`), and each rank keeps
     its own DP group's rows.

All-gather + all-reduce rather than all-to-all: two fixed-size collectives over `[T, hidden]`
keep every rank's work independent of the routing, where an all-to-all dispatch (gloo and
NCCL both take uneven splits) needs the split sizes exchanged first and a second all-to-all
to combine. All-to-all moves fewer bytes once T and ep grow; it was not built or measured
here (the collectives' share of the step is, docs/benchmarks.md). A rank with no tokens (an
idle DP group) still takes part with zero rows, so no collective waits for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.engine.collectives import LOCAL, Collectives
from shared.engine.config import ModelConfig
from shared.engine.shard import WHOLE, ModelShard


class SparseMoeBlock(nn.Module):
    """Router + this rank's stacked expert weights (`[E_local, out, in]`, like nn.Linear per expert)."""

    def __init__(self, config: ModelConfig, shard: ModelShard = WHOLE, comm: Collectives = LOCAL):
        super().__init__()
        hidden = config.hidden_size
        self.experts = shard.experts(config)  # global ids of the experts held here
        inner = len(shard.expert_columns(config))
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.comm = comm
        self.router = nn.Linear(hidden, config.num_experts, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(len(self.experts), inner, hidden))
        self.up_proj = nn.Parameter(torch.empty(len(self.experts), inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(len(self.experts), hidden, inner))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> weights [T, k] (x's dtype), expert ids [T, k] int64."""
        probs = F.softmax(self.router(x).float(), dim=-1)  # [T, E], float32 like HF
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor, dp_counts: tuple[int, ...] | None = None) -> torch.Tensor:
        # x: [T, hidden] (this rank's rows); dp_counts: rows of every DP group when attention is data-parallel
        tokens = x if dp_counts is None else self.comm.dp_all_gather(x, list(dp_counts))  # [T_all, hidden]
        out = torch.zeros_like(tokens)
        if tokens.shape[0]:
            weights, experts = self.route(tokens)
            flat_weights = weights.reshape(-1)
            assignments = dispatch(experts.reshape(-1), self.num_experts)  # per expert: flat (token, k) indices
            for local, expert in enumerate(self.experts):
                index = assignments[expert]
                if index.numel():
                    rows = index // self.top_k
                    out.index_add_(0, rows, self._expert(local, tokens[rows]) * flat_weights[index, None])
        out = self.comm.stage_all_reduce(out)
        if dp_counts is None:
            return out
        start = sum(dp_counts[: self.comm.shard.dp_group])
        return out[start : start + x.shape[0]]

    def _expert(self, local: int, h: torch.Tensor) -> torch.Tensor:
        # h: [n, hidden] -> [n, hidden], SwiGLU over this rank's columns of the expert
        return F.linear(F.silu(F.linear(h, self.gate_proj[local])) * F.linear(h, self.up_proj[local]), self.down_proj[local])


def dispatch(flat_experts: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """Assignment indices (into the flattened [T, k] choices) grouped by expert, in token order."""
    # flat_experts: [T * k] int64
    order = torch.argsort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
    return list(order.split(counts))
