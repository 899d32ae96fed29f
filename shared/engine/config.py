"""The model's architecture and identity: everything the forward pass and a KV hand-off must agree on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

# The model families our own torch code implements (the names are HF's `model_type`).
#   llama     : Llama / SmolLM2
#   qwen3     : Llama + RMSNorm over each q/k head before RoPE
#   qwen3_moe : Qwen3 with sparse mixture-of-experts MLPs
ARCHITECTURES = ("llama", "qwen3", "qwen3_moe")
_QK_NORM_ARCHITECTURES = frozenset({"qwen3", "qwen3_moe"})
_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")

# Fields that change what the KV cache of a prompt contains. Token ids (bos/eos) and the
# context limit do not, so two deployments that differ only there may still hand off KV.
# Every field of the architecture does (a later layer's KV depends on all earlier layers).
_KV_IDENTITY_FIELDS = (
    "architecture",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "weights_id",
)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder of one of `ARCHITECTURES`. `weights_id` names the weights (file identity or random seed).

    MoE fields (qwen3_moe only; 0 / empty otherwise): layer i is sparse when
    `(i + 1) % decoder_sparse_step == 0` and i is not in `mlp_only_layers`; dense layers
    use `intermediate_size`, experts `moe_intermediate_size`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # independent of hidden_size // num_heads (Qwen3 sets it on its own)
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None  # None: the tokenizer has no BOS (Qwen3)
    eos_token_ids: tuple[int, ...]
    weights_id: str = ""
    architecture: str = "llama"
    attention_bias: bool = False  # q/k/v/o projections carry a bias
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("rope_theta and rms_norm_eps must be positive")
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids must name at least one token")
        ids = (*([] if self.bos_token_id is None else [self.bos_token_id]), *self.eos_token_ids)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"special token ids {ids} must lie in [0, {self.vocab_size})")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        object.__setattr__(self, "mlp_only_layers", tuple(sorted(set(self.mlp_only_layers))))
        self._check_moe()

    def _check_moe(self) -> None:
        if self.architecture != "qwen3_moe":
            if any(getattr(self, name) for name in _MOE_FIELDS) or self.mlp_only_layers or self.norm_topk_prob:
                raise ValueError(f"MoE fields are set, but architecture {self.architecture!r} has no experts")
            return
        for name in (*_MOE_FIELDS, "decoder_sparse_step"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive for qwen3_moe, got {getattr(self, name)}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})")
        stray = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if stray:
            raise ValueError(f"mlp_only_layers {stray} are not layers of a {self.num_layers}-layer model")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qk_norm(self) -> bool:
        """Whether each query/key head is RMS-normalised before RoPE (Qwen3 families)."""
        return self.architecture in _QK_NORM_ARCHITECTURES

    def is_moe_layer(self, layer_index: int) -> bool:
        return (
            self.num_experts > 0
            and layer_index not in self.mlp_only_layers
            and (layer_index + 1) % self.decoder_sparse_step == 0
        )

    def fingerprint(self) -> str:
        """Short stable hash of what a prompt's KV depends on; equal on both ends of a hand-off."""
        identity = {name: getattr(self, name) for name in _KV_IDENTITY_FIELDS}
        # repr keeps floats exact; json with sorted keys keeps the text stable across runs.
        text = json.dumps({k: repr(v) for k, v in identity.items()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)
