"""The model's architecture and identity: everything the forward pass and a KV hand-off must agree on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

# Fields that change what the KV cache of a prompt contains. Token ids (bos/eos) and the
# context limit do not, so two deployments that differ only there may still hand off KV.
_KV_IDENTITY_FIELDS = (
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
    "weights_id",
)


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. `weights_id` names the weights (file identity or random seed)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    weights_id: str = ""

    def __post_init__(self) -> None:
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
        ids = (self.bos_token_id, *self.eos_token_ids)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"special token ids {ids} must lie in [0, {self.vocab_size})")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def fingerprint(self) -> str:
        """Short stable hash of what a prompt's KV depends on; equal on both ends of a hand-off."""
        identity = {name: getattr(self, name) for name in _KV_IDENTITY_FIELDS}
        # repr keeps floats exact; json with sorted keys keeps the text stable across runs.
        text = json.dumps({k: repr(v) for k, v in identity.items()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)
