"""Closed-form capacity of a deployment from the same cost model: to rank candidates before simulating.

Requests per second one instance sustains for the mean request, steps back to back:
- prefill: one prompt costs its chunks' step times (the role's step budget);
- decode: at the largest batch the KV cache, `max_num_seqs` and the TPOT SLO allow, a
  step emits one token per sequence;
- colocated: both on one instance, the prompt's chunks riding along with decode steps.
A deployment's capacity is its weakest pool's (search.rank). Queueing, placement and hand-offs
are left to the simulation; this only orders the candidates and brackets the goodput search.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.cost_model import CostModel, StepShape, decode_batch, prompt_chunk
from planner.deployment import MAX_NUM_SEQS, Pool, kv_tokens
from planner.hardware import Hardware
from planner.model_spec import ModelSpec
from shared.protocol import Role


@dataclass(frozen=True)
class MeanRequest:
    input_len: float
    output_len: float
    tpot_slo_s: float | None = None

    @property
    def tokens(self) -> float:
        return self.input_len + self.output_len


def prefill_seconds(cost: CostModel, input_len: int, budget: int) -> float:
    """One prompt alone, in chunks of at most `budget` tokens."""
    total, done = 0.0, 0
    while done < input_len:
        n = min(budget, input_len - done)
        total += cost.step_time(prompt_chunk(n, done))
        done += n
    return total


def decode_batch_size(cost: CostModel, kv: int, request: MeanRequest, chunk: int = 0) -> int:
    """The largest batch the cache and max_num_seqs allow whose step (with a prompt chunk of
    `chunk` tokens riding along) meets the TPOT SLO; at least 1."""
    limit = max(1, min(MAX_NUM_SEQS * cost.layout.dp, int(kv // request.tokens)))
    if request.tpot_slo_s is None:
        return limit
    context = int(request.input_len + request.output_len / 2)

    def meets(batch: int) -> bool:
        return cost.step_time(_mixed(batch, context, chunk, int(request.input_len / 2))) <= request.tpot_slo_s

    low, high = 1, limit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if meets(mid) else (low, mid - 1)
    return low


def _mixed(batch: int, context: int, chunk: int, chunk_cached: int) -> StepShape:
    """`batch` decodes plus one prompt chunk of `chunk` tokens after `chunk_cached` (a colocated step)."""
    shape = decode_batch(batch, context)
    if not chunk:
        return shape
    prompt = prompt_chunk(chunk, chunk_cached)
    return replace(prompt, decode_seqs=batch, decode_context=shape.decode_context, sampled=batch + 1)


def instance_capacity(model: ModelSpec, hardware: Hardware, pool: Pool, request: MeanRequest) -> float:
    """Requests per second one instance of the pool sustains."""
    layout, role, budget = pool.layout, pool.role, pool.step_tokens
    cost = CostModel(model, hardware, layout)
    if role is Role.PREFILL:
        return 1.0 / prefill_seconds(cost, int(request.input_len), budget)
    kv = kv_tokens(model, hardware, layout)
    context = int(request.input_len + request.output_len / 2)
    if role is Role.DECODE:
        batch = decode_batch_size(cost, kv, request)
        return batch / cost.step_time(decode_batch(batch, context)) / request.output_len
    # Colocated at steady state: every step carries a prompt chunk and the decodes that keep
    # pace with it (chunk * out / in of them), unless the SLO caps the batch first.
    chunk = min(budget, int(request.input_len))
    batch_cap = decode_batch_size(cost, kv, request, chunk)
    batch = max(1, min(batch_cap, round(chunk * request.output_len / request.input_len)))
    step = cost.step_time(_mixed(batch, context, chunk, int(request.input_len / 2)))
    return min(chunk / request.input_len, batch / request.output_len) / step
