"""Turning a preset name into a ready model: config, weights and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.engine.config import ModelConfig
from shared.engine.gguf_file import GgufFile, unpermute_rope_rows
from shared.engine.model import LlamaForCausalLM
from shared.engine.presets import GgufWeights, RandomWeights, get_preset, list_models
from shared.engine.tokenizer import ChatTokenizer

__all__ = ["LoadedModel", "list_models", "load_model", "load_model_config"]


@dataclass(frozen=True)
class LoadedModel:
    name: str
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: ChatTokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Loads preset `name` with weights in `dtype`. Raises ValueError for an unknown name."""
    preset = get_preset(name)
    gguf = GgufFile(preset.gguf_path())
    tokenizer = ChatTokenizer.from_gguf(gguf)
    match preset.weights:
        case GgufWeights():
            config = gguf.model_config()
            weights = gguf_llama_weights(gguf, config)
        case RandomWeights(config=config, seed=seed, std=std):
            weights = random_llama_weights(config, seed, std)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{name}: tokenizer has {tokenizer.vocab_size} tokens, model only {config.vocab_size}")
    weights = {key: tensor.to(dtype) for key, tensor in weights.items()}
    return LoadedModel(name, config, LlamaForCausalLM.from_state_dict(config, weights), tokenizer)


def load_model_config(name: str) -> ModelConfig:
    """The config alone (metadata only, no weights): cheap enough for the gateway."""
    preset = get_preset(name)
    match preset.weights:
        case GgufWeights():
            return GgufFile(preset.gguf_path()).model_config()
        case RandomWeights(config=config):
            return config


# Our parameter name -> llama.cpp tensor name, per layer.
_GGUF_LAYER_NAMES = {
    "input_norm.weight": "attn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.o_proj.weight": "attn_output.weight",
    "post_attn_norm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_llama_weights(gguf: GgufFile, config: ModelConfig) -> dict[str, torch.Tensor]:
    """float32 state dict for LlamaForCausalLM from a llama.cpp GGUF (dequantized, Q/K rows un-permuted)."""
    weights = {
        "embed_tokens.weight": gguf.tensor("token_embd.weight"),
        "norm.weight": gguf.tensor("output_norm.weight"),
    }
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = gguf.tensor("output.weight")
    for i in range(config.num_layers):
        for ours, theirs in _GGUF_LAYER_NAMES.items():
            weights[f"layers.{i}.{ours}"] = gguf.tensor(f"blk.{i}.{theirs}")
        q_key, k_key = f"layers.{i}.attn.q_proj.weight", f"layers.{i}.attn.k_proj.weight"
        weights[q_key] = unpermute_rope_rows(weights[q_key], config.num_heads)
        weights[k_key] = unpermute_rope_rows(weights[k_key], config.num_kv_heads)
    # Quantized tensors dequantize into fresh arrays; F32 ones are read-only views of the file: copy only those.
    return {key: torch.from_numpy(np.require(array, requirements=["C", "W"])) for key, array in weights.items()}


def random_llama_weights(config: ModelConfig, seed: int, std: float) -> dict[str, torch.Tensor]:
    """Deterministic N(0, std) weights; norm weights are 1. Same seed, same weights, on any machine."""
    with torch.device("meta"):
        shapes = {key: t.shape for key, t in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in sorted(shapes.items()):  # sorted: the draw order must not depend on module order
        if key.endswith("norm.weight"):
            weights[key] = torch.ones(shape)
        else:
            weights[key] = torch.randn(shape, generator=generator) * std
    return weights
