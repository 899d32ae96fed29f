"""The `pdserve admin policy` command whose `--mode auto` thresholds match the plan.

`--mode auto` decides per request with the scheduler's own `estimate_ttft`: prefill locally
on the decode worker, or remotely on the prefill pool plus a KV hand-off. The planner sets
its inputs from the simulated deployment (the prefill pool's rate, the decode workers'
prefill rate relative to it, the hand-off link) and finds the shortest prompt for which
`estimate_ttft` itself prefers the remote path on idle workers: `remote_min_prompt_tokens`.
When the plan recommends colocated, the threshold is the model's context length, so auto
keeps every prefill local. The values go through `Policy.updated`, as the admin endpoint
parses them, so the command is valid by construction.
"""

from __future__ import annotations

from planner.capacity import prefill_seconds
from planner.cost_model import CostModel
from planner.deployment import Deployment
from planner.hardware import Hardware
from planner.model_spec import ModelSpec
from services.scheduler import policy as scheduler_policy
from services.scheduler.registry import WorkerLoad
from shared.protocol import Heartbeat, PlaceRequest, Role

_PROBE_LENGTHS = [2**k for k in range(4, 21)]  # 16 .. 1M tokens


def _idle(role: Role, prefill_rate: float, handoff_rate: float, kv_bytes_per_token: int) -> WorkerLoad:
    beat = Heartbeat(worker_id=role.label, role=role, model="m", model_fingerprint="", ucx_host="", ucx_port=0, running=0,
                     waiting=0, free_kv_blocks=1, total_kv_blocks=1, queued_prefill_tokens=0, sent_at=0.0,
                     kv_bytes_per_token=kv_bytes_per_token, prefill_tokens_per_s=prefill_rate, handoff_bytes_per_s=handoff_rate)
    return WorkerLoad(beat=beat, seen_at=0.0)


def auto_policy(model: ModelSpec, hardware: Hardware, disagg: Deployment, mean_input: int, recommend_disagg: bool) -> scheduler_policy.Policy:
    prefill, decode = disagg.pool(Role.PREFILL), disagg.pool(Role.DECODE)
    remote_cost = CostModel(model, hardware, prefill.layout)
    local_cost = CostModel(model, hardware, decode.layout)
    remote_rate = mean_input / prefill_seconds(remote_cost, mean_input, prefill.step_tokens)
    local_rate = mean_input / prefill_seconds(local_cost, mean_input, decode.step_tokens)
    links = remote_cost.handoff_links(decode.layout)
    bandwidth = hardware.handoff_bandwidth(disagg.devices) * links
    kv_per_token = model.kv_bytes_per_token(hardware.kv_bytes)
    base = scheduler_policy.Policy().updated({
        "mode": "auto",
        "prefill_tokens_per_s": round(remote_rate, 1),
        "handoff_bytes_per_s": round(bandwidth, -3),
        "handoff_overhead_s": hardware.efficiency.handoff_overhead_s,
        "local_prefill_efficiency": round(min(1.0, local_rate / remote_rate), 3),
    })
    threshold = model.max_context
    if recommend_disagg:
        threshold = crossover(base, kv_per_token, model.max_context)
    return base.updated({"remote_min_prompt_tokens": threshold})


def crossover(policy: scheduler_policy.Policy, kv_bytes_per_token: int, max_context: int) -> int:
    """The shortest probed prompt for which the scheduler's estimate prefers remote prefill (else max_context)."""
    prefill = _idle(Role.PREFILL, policy.prefill_tokens_per_s, policy.handoff_bytes_per_s, kv_bytes_per_token)
    decode = _idle(Role.DECODE, policy.prefill_tokens_per_s, 0.0, kv_bytes_per_token)
    for length in _PROBE_LENGTHS:
        estimate = scheduler_policy.estimate_ttft(PlaceRequest("probe", "m", length, 1), prefill, decode, policy)
        if estimate.remote_s < estimate.local_s:
            return length
    return max_context


def policy_command(policy: scheduler_policy.Policy) -> str:
    keys = ("remote_min_prompt_tokens", "prefill_tokens_per_s", "handoff_bytes_per_s", "handoff_overhead_s", "local_prefill_efficiency")
    settings = " ".join(f"{key}={_number(getattr(policy, key))}" for key in keys)
    return f"pdserve admin policy --mode {policy.mode.value} {settings}"


def _number(value: int | float) -> str:
    """As `Policy.updated` reads it back: ints whole, floats in 6 significant digits."""
    return str(value) if isinstance(value, int) else f"{value:.6g}"
