"""What is deployed: pools of worker instances, their layouts, whether a model fits, how much KV each holds.

An *instance* is one pdserve worker (a rank group of `world` devices with one engine and
one step loop); a *pool* is `count` identical instances of one role. Colocated is one pool
of role `both`; disaggregated is a prefill pool and a decode pool. Layouts are the project's
own (`shared/layouts.py`), validated by its own `layout_problems` against the model.

Memory per device (bf16 unless the hardware says otherwise):
  weights = non-expert params / (tp * pp)  +  routed-expert params / max(ep, pp)
  KV per token = the model's KV bytes / (pp * min(tp, KV heads))   (heads replicate past tp > heads)
  KV tokens per DP group = (HBM * (1 - reserve) - weights) / KV per token
An instance holds dp times that (or the hardware's fixed `kv_cache_tokens`, for `local`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from planner.hardware import Hardware
from planner.model_spec import ModelSpec
from services.scheduler.policy import Mode
from shared.kv_spec import KvSpec
from shared.layouts import DecoderLayout, Layout, PrefillLayout, layout_problems
from shared.protocol import Role

BLOCK_SIZE = 16  # pdserve up's --block-size
MAX_NUM_SEQS = 256  # pdserve up's --max-num-seqs (per DP group here)
MAX_WAITING = 64  # pdserve up's --max-waiting, and the policy's max_waiting_per_worker
# services/worker/main.py DEFAULT_STEP_TOKENS (a test checks they agree): tokens per engine step by role.
STEP_TOKENS = {Role.PREFILL: 2048, Role.DECODE: 512, Role.BOTH: 512}


@dataclass(frozen=True)
class Pool:
    role: Role
    layout: Layout
    count: int
    step_tokens: int = 0  # max_num_batched_tokens of its engines; 0: pdserve's default for the role

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"a pool needs at least one instance, got {self.count}")
        if self.step_tokens < 0:
            raise ValueError(f"step_tokens must be >= 0, got {self.step_tokens}")
        if not self.step_tokens:
            object.__setattr__(self, "step_tokens", STEP_TOKENS[self.role])
        if self.role is Role.PREFILL and not isinstance(self.layout, PrefillLayout):
            raise ValueError("a prefill pool takes a prefill layout")
        if self.role is not Role.PREFILL and not isinstance(self.layout, DecoderLayout):
            raise ValueError(f"a {self.role.label} pool takes a decode layout")

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def devices(self) -> int:
        return self.world * self.count

    def describe(self) -> str:
        return f"{self.count} x {self.role.label} [{self.layout.describe()}, {self.step_tokens} tokens/step]"


@dataclass(frozen=True)
class Deployment:
    mode: Mode
    pools: tuple[Pool, ...]

    def __post_init__(self) -> None:
        roles = sorted(p.role for p in self.pools)
        expected = [Role.BOTH] if self.mode is Mode.COLOCATED else [Role.PREFILL, Role.DECODE]
        if self.mode is Mode.AUTO or roles != expected:
            raise ValueError(f"{self.mode.value} needs pools of roles {[r.label for r in expected]}, got {[r.label for r in roles]}")

    @property
    def devices(self) -> int:
        return sum(p.devices for p in self.pools)

    def pool(self, role: Role) -> Pool:
        return next(p for p in self.pools if p.role is role)

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.pools)


def kv_spec(model: ModelSpec) -> KvSpec:
    """The project's KV spec of the model, for its layout checks."""
    return KvSpec(model.name, model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim,
                  dtype=torch.bfloat16, num_experts=model.num_experts)


def layout_errors(model: ModelSpec, layout: Layout) -> list[str]:
    return layout_problems(layout, kv_spec(model))


def weight_bytes_per_device(model: ModelSpec, hardware: Hardware, layout: Layout) -> float:
    dense = model.non_expert_params / (layout.tp * layout.pp)
    experts = model.routed_expert_params / max(layout.ep, layout.pp)
    return (dense + experts) * hardware.weight_bytes


def kv_bytes_per_token_per_device(model: ModelSpec, hardware: Hardware, layout: Layout) -> float:
    return model.kv_bytes_per_token(hardware.kv_bytes) / (layout.pp * min(layout.tp, model.num_kv_heads))


def kv_tokens(model: ModelSpec, hardware: Hardware, layout: Layout) -> int:
    """Tokens of KV one instance holds (0 when the weights leave no room)."""
    if hardware.kv_cache_tokens is not None:
        return hardware.kv_cache_tokens
    usable = hardware.hbm_bytes * (1 - hardware.efficiency.memory_reserve)
    free = usable - weight_bytes_per_device(model, hardware, layout)
    if free <= 0:
        return 0
    return layout.dp * int(free // kv_bytes_per_token_per_device(model, hardware, layout))


def fits(model: ModelSpec, hardware: Hardware, layout: Layout, max_request_tokens: int) -> bool:
    """The layout is valid for the model and one instance holds the longest request's KV."""
    return not layout_errors(model, layout) and kv_tokens(model, hardware, layout) >= max_request_tokens


def sim_block_size(hardware: Hardware, max_request_tokens: int) -> int:
    """KV page size the simulation allocates in: pdserve's 16 where the budget is pdserve's
    (`local`); on rack presets pages grow (powers of two) until the longest request takes
    at most 64, so allocation stays cheap. A reservation then rounds up by less than one
    page: under 2% of the request's KV."""
    size = BLOCK_SIZE
    while hardware.kv_cache_tokens is None and max_request_tokens > 64 * size:
        size *= 2
    return size


def _powers_of_two(limit: int) -> list[int]:
    out, w = [], 1
    while w <= limit:
        out.append(w)
        w *= 2
    return out


def candidate_layouts(model: ModelSpec, hardware: Hardware, role: Role, max_world: int, max_request_tokens: int) -> list[Layout]:
    """Layouts searched for one instance of `role`, smallest world first; those that fit.

    Worlds are powers of two. Prefill: tp = world (ep = world for MoE, as the seed's
    `tp=4, ep=4`). Decode and colocated: dense models tp = world; MoE models ep = world with
    dp * tp = world for tp in 1, 2, 4, 8 and world (the seed's `dp=4, ep=16` is tp=4).
    """
    layouts: list[Layout] = []
    for world in _powers_of_two(min(max_world, hardware.max_world or max_world)):
        ep = world if model.is_moe else 1
        if role is Role.PREFILL:
            options: list[Layout] = [PrefillLayout(tp=world, ep=ep)]
        elif not model.is_moe:
            options = [DecoderLayout(dp=1, tp=world)]
        else:
            tps = sorted({t for t in (1, 2, 4, 8, world) if t <= world and world % t == 0})
            options = [DecoderLayout(dp=world // t, tp=t, ep=ep) for t in tps]
        layouts += [layout for layout in options if fits(model, hardware, layout, max_request_tokens)]
    return layouts
