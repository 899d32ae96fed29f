"""Roofline step time of one instance, and the time of one KV hand-off.

A step is what `shared/engine/scheduler.Scheduler.schedule()` plans: decodes (one token
each, attending over their cached context) and prompt chunks (n new tokens after c cached).
Its time on an instance of layout (tp, pp, dp, ep) is

  step = host overhead + sum over operator classes of max(compute time, memory time) + collectives

per operator class (each bound by its own roofline):
- dense linears (attention projections, dense MLPs, router, shared expert): FLOPs 2 * params
  per token, on the tp ranks of the DP group holding the token; weights read once per step;
- routed experts: FLOPs 2 * k * expert params per token over the ep ranks (times the EP
  imbalance); weights read only for the experts the step's tokens touch, expected
  E * (1 - (1 - k/E)^T) per layer for T tokens;
- attention: 4 * heads * head_dim FLOPs per (query, cached key) pair per layer; reads the KV
  actually cached (every decode its whole context, every prompt chunk its prefix);
- LM head: only for the rows that sample a token.
Collectives per layer: a tp all-reduce after attention and after a dense MLP; a MoE layer
with ep > 1 does an all-to-all dispatch and combine instead of its all-reduce. Each costs
its latency plus a ring's bytes over NVLink when the group fits in one NVLink domain, else
over the NIC. Pipeline stages run one step one after another, so pp adds p2p hops and
divides memory, not time. Data-parallel groups step in lockstep: the step waits for the
busiest group (decodes spread evenly; a prompt chunk sits in one group).
A KV hand-off moves prompt * KV bytes per token, one link per (source, destination) rank pair
that holds distinct KV heads, plus a fixed overhead: over NVLink when the whole deployment
fits in one NVLink domain, else over the NIC (hardware.handoff_bandwidth).
Efficiency factors: efficiency.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.hardware import Hardware
from planner.model_spec import ModelSpec
from shared.layouts import Layout

ACTIVATION_BYTES = 2  # bf16 activations on the wire


@dataclass(frozen=True)
class StepShape:
    """What one engine step runs, summed over its sequences."""

    decode_seqs: int = 0  # sequences decoding one token
    decode_context: int = 0  # their cached tokens, summed (each attends over its context + itself)
    prefill_tokens: int = 0  # prompt tokens run, summed over chunks
    prefill_pairs: float = 0.0  # (query, key) pairs of the chunks: sum of n * (c + (n + 1) / 2)
    prefill_context: int = 0  # KV tokens the chunks read: sum of c + n
    largest_chunk: int = 0  # the biggest chunk (it sits in one DP group)
    sampled: int = 0  # rows through the LM head: decodes + chunks that finish their prompt

    @property
    def tokens(self) -> int:
        return self.decode_seqs + self.prefill_tokens

    @property
    def num_seqs(self) -> int:
        return self.decode_seqs + (1 if self.prefill_tokens else 0)


def prompt_chunk(num_new: int, num_cached: int) -> StepShape:
    """One prompt chunk alone: `num_new` tokens after `num_cached` (a whole prompt: num_cached = 0)."""
    pairs = num_new * (num_cached + (num_new + 1) / 2)
    return StepShape(prefill_tokens=num_new, prefill_pairs=pairs, prefill_context=num_cached + num_new,
                     largest_chunk=num_new, sampled=1)


def decode_batch(batch: int, context_each: int) -> StepShape:
    return StepShape(decode_seqs=batch, decode_context=batch * context_each, sampled=batch)


@dataclass(frozen=True)
class StepCost:
    total_s: float
    compute_s: float  # sum of the compute terms
    memory_s: float  # sum of the memory terms
    comm_s: float
    overhead_s: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


class CostModel:
    """Step times of one instance of `layout` serving `model` on `hardware`."""

    def __init__(self, model: ModelSpec, hardware: Hardware, layout: Layout):
        self.model, self.hardware, self.layout = model, hardware, layout
        eff = hardware.efficiency
        m = model
        self.ranks = layout.world // layout.pp  # devices a step's work spreads over (stages run in turn)
        self.ep = max(1, layout.ep // layout.pp)
        self.kv_split = min(layout.tp, m.num_kv_heads)
        self.gemm_rate = hardware.flops * eff.gemm
        self.attn_rate = hardware.flops * eff.attention
        self.hbm_rate = hardware.hbm_bandwidth * eff.hbm
        self.dense_flops = 2.0 * (m.active_body_params - m.num_moe_layers * m.experts_per_token * m.expert_params)
        self.dense_bytes = (m.non_expert_params - m.lm_head_params * (1 if m.tie_embeddings else 2)) * hardware.weight_bytes
        self.expert_flops = 2.0 * m.experts_per_token * m.expert_params * m.num_moe_layers
        self.expert_layer_bytes = m.expert_params * hardware.weight_bytes * m.num_moe_layers  # one expert, all MoE layers
        self.imbalance = eff.ep_imbalance if self.ep > 1 else 1.0
        self.head_flops = 2.0 * m.lm_head_params
        self.head_bytes = m.lm_head_params * hardware.weight_bytes
        self.pair_flops = float(m.attention_flops_per_pair)
        self.kv_token_bytes = m.kv_bytes_per_token(hardware.kv_bytes) / self.kv_split
        self.comm = self._comm_constants()

    # -- collectives ---------------------------------------------------------------------------

    def _comm_constants(self) -> tuple[float, float]:
        """(seconds per step, seconds per token in a DP group) spent in collectives."""
        m, hw, lay = self.model, self.hardware, self.layout
        fixed, per_token = 0.0, 0.0
        hidden_bytes = m.hidden * ACTIVATION_BYTES
        if lay.tp > 1:
            reduces = m.num_layers + m.num_dense_layers + (m.num_moe_layers if self.ep == 1 else 0)
            fixed += reduces * hw.link_latency(lay.tp)
            per_token += reduces * 2 * (lay.tp - 1) / lay.tp * hidden_bytes / hw.link_bandwidth(lay.tp)
        if self.ep > 1 and m.num_moe_layers:
            # dispatch + combine: each token's hidden state to (and back from) its k experts' ranks;
            # a DP group's tokens leave from its tp ranks in parallel
            fixed += 2 * m.num_moe_layers * hw.link_latency(lay.ep)
            share = m.experts_per_token * (self.ep - 1) / self.ep / lay.tp
            per_token += 2 * m.num_moe_layers * share * hidden_bytes / hw.link_bandwidth(lay.ep)
        if lay.pp > 1:
            fixed += (lay.pp - 1) * hw.link_latency(lay.world)
            per_token += (lay.pp - 1) * hidden_bytes / hw.link_bandwidth(lay.world)
        return fixed, per_token

    # -- step time -------------------------------------------------------------------------------

    def _group_tokens(self, s: StepShape) -> float:
        """Tokens of the busiest DP group: decodes spread evenly, a prompt chunk stays in its group."""
        dp = self.layout.dp
        if dp == 1:
            return float(s.decode_seqs + s.prefill_tokens)
        return s.decode_seqs / dp + max(s.prefill_tokens / dp, float(s.largest_chunk))

    def _weights_and_head(self, s: StepShape) -> tuple[float, float, float]:
        """(roofline, compute, memory) seconds of the linears: dense, routed experts, LM head."""
        tp, tokens = self.layout.tp, s.decode_seqs + s.prefill_tokens
        dense_c = self.dense_flops * self._group_tokens(s) / tp / self.gemm_rate
        dense_m = self.dense_bytes / tp / self.hbm_rate
        expert_c = expert_m = 0.0
        if self.expert_flops:
            m = self.model
            touched = m.num_experts * (1.0 - (1.0 - m.experts_per_token / m.num_experts) ** tokens)
            expert_c = self.expert_flops * tokens / self.ranks * self.imbalance / self.gemm_rate
            expert_m = self.expert_layer_bytes * touched / self.ep * self.imbalance / self.hbm_rate
        rows = s.sampled / self.layout.dp
        head_c = self.head_flops * rows / tp / self.gemm_rate
        head_m = self.head_bytes / tp / self.hbm_rate if s.sampled else 0.0
        roofline = max(dense_c, dense_m) + max(expert_c, expert_m) + max(head_c, head_m)
        return roofline, dense_c + expert_c + head_c, dense_m + expert_m + head_m

    def _attention_rates(self, s: StepShape) -> tuple[float, float, float, float]:
        """Attention compute = c0 + c1 * decode_context, memory = m0 + m1 * decode_context (seconds)."""
        share = 1.0 / self.layout.dp
        per_pair = self.pair_flops * share / self.layout.tp / self.attn_rate
        per_kv = self.kv_token_bytes * share / self.hbm_rate
        tokens = s.decode_seqs + s.prefill_tokens
        c0 = per_pair * (s.prefill_pairs + s.decode_seqs)  # each decode also attends to itself
        m0 = per_kv * (s.prefill_context + tokens)  # the prompts' prefixes, plus every new token's write
        return c0, per_pair, m0, per_kv

    def _comm_time(self, s: StepShape) -> float:
        return self.comm[0] + self.comm[1] * self._group_tokens(s)

    def _overhead(self, s: StepShape) -> float:
        eff = self.hardware.efficiency
        return eff.step_overhead_s + eff.seq_overhead_s * s.num_seqs

    def cost(self, s: StepShape) -> StepCost:
        if not s.tokens:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0)
        linears, compute, memory = self._weights_and_head(s)
        c0, c1, m0, m1 = self._attention_rates(s)
        attn_c, attn_m = c0 + c1 * s.decode_context, m0 + m1 * s.decode_context
        comm, overhead = self._comm_time(s), self._overhead(s)
        total = linears + max(attn_c, attn_m) + comm + overhead
        return StepCost(total, compute + attn_c, memory + attn_m, comm, overhead)

    def step_time(self, s: StepShape) -> float:
        return self.cost(s).total_s

    def decode_run(self, s: StepShape, steps: int) -> np.ndarray:
        """Durations of `steps` consecutive decode-only steps of `s`, each context one token longer per sequence."""
        fixed = self.step_time(s)
        c0, c1, m0, m1 = self._attention_rates(s)
        first = max(c0 + c1 * s.decode_context, m0 + m1 * s.decode_context)
        contexts = s.decode_context + s.decode_seqs * np.arange(steps, dtype=np.float64)
        return (fixed - first) + np.maximum(c0 + c1 * contexts, m0 + m1 * contexts)

    # -- KV hand-off ---------------------------------------------------------------------------

    def handoff_links(self, decode_layout: Layout) -> int:
        """Rank pairs that move distinct KV in parallel (a head replicated past tp > heads is sent once)."""
        heads = self.model.num_kv_heads
        src = min(self.layout.tp, heads) * self.layout.pp
        dst = min(decode_layout.tp, heads) * decode_layout.pp
        return max(1, min(src, dst))

    def handoff_time(self, prompt_tokens: int, decode_layout: Layout, devices: int) -> float:
        """One prompt's KV from this instance to a `decode_layout` instance, in a deployment of `devices`."""
        hw = self.hardware
        nbytes = prompt_tokens * self.model.kv_bytes_per_token(hw.kv_bytes)
        bandwidth = hw.handoff_bandwidth(devices) * self.handoff_links(decode_layout)
        return hw.efficiency.handoff_overhead_s + nbytes / bandwidth
