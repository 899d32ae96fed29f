"""Reading only one rank's shard of every parameter from a checkpoint.

`shard_index(name, ...)` says which part of the whole parameter a rank holds (shard.py
explains the split); a `TensorSource` reads just that part — a memory-mapped slice of a
safetensors file (HF folders, converted GGUF copies), or a tensor drawn and cut (random
presets) — so no rank materialises the whole model. Vocabulary shards are zero-padded to
equal sizes (the last rank's rows beyond the vocabulary are never looked up, and their
logits are cut off after the gather).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from shared.engine.config import ModelConfig
from shared.engine.shard import ModelShard

Index = tuple[slice, ...]


@dataclass(frozen=True)
class ShardIndex:
    index: Index  # into the whole parameter
    pad_rows: int = 0  # zero rows appended (vocabulary padding)


class TensorSource(Protocol):
    def read(self, name: str, index: Index) -> torch.Tensor:
        """The part `index` of our parameter `name` (whole-model shape), any float dtype."""
        ...

    def describe(self, name: str) -> str:
        """Where parameter `name` comes from, for messages (e.g. the checkpoint's tensor name)."""
        ...


def _rows(r: range) -> slice:
    return slice(r.start, r.stop)


def shard_index(name: str, shape: torch.Size, config: ModelConfig, shard: ModelShard) -> ShardIndex:
    """Which part of parameter `name` (whole shape `shape`) rank `shard` holds."""
    whole = tuple(slice(None) for _ in shape)
    if shard.is_whole:
        return ShardIndex(whole)
    dim = config.head_dim
    if name in ("embed_tokens.weight", "lm_head.weight"):
        vocab = shard.vocab(config)
        return ShardIndex((_rows(vocab), slice(None)), shard.vocab_rows_per_rank(config) - len(vocab))
    parts = name.split(".")
    if parts[0] != "layers":
        return ShardIndex(whole)  # the final norm
    leaf = ".".join(parts[2:])
    heads_q = shard.q_heads(config)
    heads_kv = shard.kv_heads(config)
    if leaf in ("attn.q_proj.weight", "attn.q_proj.bias"):
        return ShardIndex((slice(heads_q.start * dim, heads_q.stop * dim), *whole[1:]))
    if leaf in ("attn.k_proj.weight", "attn.k_proj.bias", "attn.v_proj.weight", "attn.v_proj.bias"):
        return ShardIndex((slice(heads_kv.start * dim, heads_kv.stop * dim), *whole[1:]))
    if leaf == "attn.o_proj.weight":
        return ShardIndex((slice(None), slice(heads_q.start * dim, heads_q.stop * dim)))
    if leaf in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return ShardIndex((_rows(shard.columns(config.intermediate_size)), slice(None)))
    if leaf == "mlp.down_proj.weight":
        return ShardIndex((slice(None), _rows(shard.columns(config.intermediate_size))))
    if leaf in ("mlp.gate_proj", "mlp.up_proj"):  # expert stacks [E, inner, hidden]
        return ShardIndex((_rows(shard.experts(config)), _rows(shard.expert_columns(config)), slice(None)))
    if leaf == "mlp.down_proj":  # [E, hidden, inner]
        return ShardIndex((_rows(shard.experts(config)), slice(None), _rows(shard.expert_columns(config))))
    return ShardIndex(whole)  # norms, q/k norms, the router, o_proj's bias (slice 0 alone has one)


def read_shard(
    source: TensorSource, config: ModelConfig, shard: ModelShard, local: dict[str, torch.Size], whole: dict[str, torch.Size],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Every parameter of the rank's model (`local` shapes) read from `source`, in `dtype`."""
    weights = {}
    for name, shape in local.items():
        part = shard_index(name, whole[name], config, shard)
        tensor = source.read(name, part.index)
        if part.pad_rows:
            tensor = F.pad(tensor, (0, 0, 0, part.pad_rows))
        if tensor.shape != shape:
            whole_shape = tuple(whole[name])
            raise ValueError(
                f"{source.describe(name)} gave a {tuple(tensor.shape)} shard where the config implies "
                f"{tuple(shape)} (of {whole_shape}): the checkpoint does not match its config"
            )
        weights[name] = tensor.to(dtype).contiguous()
    return weights
