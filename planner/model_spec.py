"""What the cost model needs of a model: shapes, parameters, active parameters, FLOPs and KV bytes per token.

`--model` may name:
- an architecture preset below (published HF config.json values, sources given), parsed by
  the same code as a config.json file, so both paths agree;
- a project preset (`tiny-llama`, `smollm2-135m`, ...) or .gguf file, through the engine's
  own `load_model_config`;
- a path to an HF `config.json` (or the folder holding it); dense or MoE decoders with
  grouped-query attention (llama, qwen2/3, qwen2/3-MoE, mistral, mixtral families).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Published configs (only the keys used here), from huggingface.co/<repo>/blob/main/config.json.
ARCHITECTURE_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-235b-a22b": ("huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json", {
        "model_type": "qwen3_moe", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 94,
        "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
        "tie_word_embeddings": False, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1536,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960,
    }),
    "llama-3.1-8b": ("huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json", {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    }),
    "llama-3.1-70b": ("huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json", {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    }),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width (layers without experts)
    vocab: int
    tie_embeddings: bool
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    num_moe_layers: int = 0
    shared_expert_intermediate: int = 0  # an always-on expert beside the routed ones (qwen2-MoE)
    max_context: int = 1 << 20
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{self.name}: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: {self.num_heads} heads are not a multiple of {self.num_kv_heads} KV heads")
        if self.num_experts and not (0 < self.experts_per_token <= self.num_experts and self.expert_intermediate > 0):
            raise ValueError(f"{self.name}: MoE needs 0 < experts per token <= {self.num_experts} and an expert width")
        if not 0 <= self.num_moe_layers <= self.num_layers:
            raise ValueError(f"{self.name}: {self.num_moe_layers} MoE layers out of {self.num_layers}")

    # -- parameters per part -----------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def attention_params(self) -> int:
        """q, k, v, o projections of one layer."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv)

    @property
    def expert_params(self) -> int:
        """One routed expert (gate, up, down)."""
        return 3 * self.hidden * self.expert_intermediate

    @property
    def moe_layer_fixed_params(self) -> int:
        """What every token of a MoE layer uses besides its routed experts: router and shared expert."""
        return self.hidden * self.num_experts + 3 * self.hidden * self.shared_expert_intermediate

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def non_expert_params(self) -> int:
        """Everything but the routed experts: replicated per data-parallel group, sharded by tp."""
        body = self.num_layers * self.attention_params + self.num_dense_layers * self.dense_mlp_params
        body += self.num_moe_layers * self.moe_layer_fixed_params
        embeddings = self.lm_head_params * (1 if self.tie_embeddings else 2)
        return body + embeddings

    @property
    def routed_expert_params(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.routed_expert_params

    @property
    def active_body_params(self) -> int:
        """Parameters one token multiplies by in the layers (no embedding lookup, no LM head)."""
        body = self.num_layers * self.attention_params + self.num_dense_layers * self.dense_mlp_params
        moe = self.moe_layer_fixed_params + self.experts_per_token * self.expert_params
        return body + self.num_moe_layers * moe

    @property
    def active_params(self) -> int:
        """Per generated token: the layers' active parameters plus the LM head."""
        return self.active_body_params + self.lm_head_params

    @property
    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token through the layers and LM head, attention over the context excluded."""
        return 2 * self.active_params

    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs of one (query token, cached token) pair over all layers: QK^T and AV."""
        return 4 * self.num_heads * self.head_dim * self.num_layers

    def kv_bytes_per_token(self, kv_bytes: int) -> int:
        """K and V of one token, all layers and KV heads."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * kv_bytes

    def as_dict(self, kv_bytes: int) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "params": self.total_params,
            "active_params": self.active_params,
            "flops_per_token": self.flops_per_token,
            "kv_bytes_per_token": self.kv_bytes_per_token(kv_bytes),
            "layers": self.num_layers,
            "experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
        }


def from_hf_config(name: str, raw: dict[str, Any], source: str) -> ModelSpec:
    """A ModelSpec from config.json values; ValueError names a missing key or an unsupported design."""
    if "kv_lora_rank" in raw or "q_lora_rank" in raw:
        raise ValueError(f"{source}: multi-head latent attention (DeepSeek) is not modelled; use a GQA model")

    def need(*keys: str) -> Any:
        for key in keys:
            if raw.get(key) is not None:
                return raw[key]
        raise ValueError(f"{source}: config has no {keys[0]!r}")

    hidden, layers, heads = need("hidden_size"), need("num_hidden_layers"), need("num_attention_heads")
    experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    moe_layers = 0
    if experts:
        step = int(raw.get("decoder_sparse_step") or 1)
        dense_only = set(raw.get("mlp_only_layers") or [])
        moe_layers = sum(1 for i in range(layers) if (i + 1) % step == 0 and i not in dense_only)
    intermediate = need("intermediate_size")
    return ModelSpec(
        name=name,
        num_layers=layers,
        hidden=hidden,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        intermediate=intermediate,
        vocab=need("vocab_size"),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        num_experts=experts,
        experts_per_token=int(raw.get("num_experts_per_tok") or 0),
        expert_intermediate=int(raw.get("moe_intermediate_size") or (intermediate if experts else 0)),
        num_moe_layers=moe_layers,
        shared_expert_intermediate=int(raw.get("shared_expert_intermediate_size") or 0),
        max_context=int(raw.get("max_position_embeddings") or 1 << 20),
        source=source,
    )


def from_model_config(name: str, config: Any) -> ModelSpec:
    """From the engine's ModelConfig (a project preset or a file the engine loads)."""
    moe_layers = sum(1 for i in range(config.num_layers) if config.is_moe_layer(i))
    return ModelSpec(
        name=name,
        num_layers=config.num_layers,
        hidden=config.hidden_size,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        tie_embeddings=config.tie_word_embeddings,
        num_experts=config.num_experts,
        experts_per_token=config.num_experts_per_tok,
        expert_intermediate=config.moe_intermediate_size,
        num_moe_layers=moe_layers,
        max_context=config.max_position_embeddings,
        source="pdserve preset" if "/" not in name else name,
    )


def load_model_spec(name: str) -> ModelSpec:
    """Architecture preset, then a config.json (file or folder), then whatever the engine loads."""
    if name in ARCHITECTURE_PRESETS:
        source, raw = ARCHITECTURE_PRESETS[name]
        return from_hf_config(name, raw, source)
    path = Path(name).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.name.endswith(".json") and config_file.is_file():
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_file}: not valid JSON ({exc})") from None
        return from_hf_config(name, raw, str(config_file))
    from shared.engine.loader import load_model_config  # torch and the engine: only for project models

    try:
        return from_model_config(name, load_model_config(name))
    except ValueError as exc:
        presets = ", ".join(ARCHITECTURE_PRESETS)
        raise ValueError(f"{exc}; the planner also knows {presets} and any HF config.json") from None
