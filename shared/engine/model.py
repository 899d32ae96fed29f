"""The decoder families (Llama/SmolLM2, Qwen3, Qwen3-MoE) in plain PyTorch, over a paged KV cache.

RMSNorm -> attention (RoPE in HF's rotate_half convention, grouped-query heads) ->
residual -> RMSNorm -> SwiGLU MLP -> residual, then a final norm and the LM head
(tied to the embedding when the checkpoint has no separate one). The families differ in
two places only, both chosen from the config:
- Qwen3 RMS-normalises each query and key head (over head_dim) before RoPE, and its
  head_dim is independent of hidden_size / num_heads;
- Qwen3-MoE replaces the MLP of its sparse layers with a routed mixture of experts (moe.py).
Parameter names are our own; the loaders map checkpoint names onto them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from shared.engine.attention import paged_attention
from shared.engine.batch import ForwardBatch
from shared.engine.config import ModelConfig
from shared.engine.kv_cache import PagedKVCache
from shared.engine.collectives import LOCAL, Collectives
from shared.engine.moe import SparseMoeBlock
from shared.engine.shard import WHOLE, ModelShard


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op instead of seven (the same formula, float32 throughout)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Statistics in float32 even for bf16 activations, like the HF reference.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once in float32; `tables` gathers a batch's rows once per forward."""

    cos: torch.Tensor  # [P, D] buffers
    sin: torch.Tensor

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        # Explicit device: the model may be built under torch.device("meta"), these must be real.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv_freq = 1.0 / (theta**exponents)  # [D/2]
        angles = torch.arange(max_positions, dtype=torch.float32, device="cpu")[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)  # [P, D]: rotate_half pairs i with i + D/2
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        # positions: [T]
        cos, sin = self.cos[positions], self.sin[positions]  # [T, D]
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return RopeTables(cos.to(dtype)[:, None, :], signed_sin.to(dtype)[:, None, :])  # [T, 1, D]


class RopeTables(NamedTuple):
    """cos and sin `[T, 1, D]` at the batch's positions, shared by every layer of one forward.

    HF's `x * cos + rotate_half(x) * sin` with rotate_half(x) = [-x2, x1]: the same products
    as `x * cos + roll(x) * signed_sin`, roll(x) = [x2, x1] and signed_sin = [-sin1, sin2]
    (negation is exact), in one op instead of three.
    """

    cos: torch.Tensor
    signed_sin: torch.Tensor

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H, D] -> [T, H, D]
        return x * self.cos + x.roll(x.shape[-1] // 2, dims=-1) * self.signed_sin


_ALIGNMENT = 64  # bytes: torch's CPU allocator gives at least this


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_contiguous() and tensor.data_ptr() % _ALIGNMENT == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class Attention(nn.Module):
    """This rank's query heads and KV heads (all of them on one rank); o_proj outputs summed over the slices."""

    def __init__(self, config: ModelConfig, cache_layer: int, shard: ModelShard = WHOLE, comm: Collectives = LOCAL):
        super().__init__()
        self.layer_index = cache_layer  # this layer's place in the rank's own KV cache
        self.num_heads = len(shard.q_heads(config))
        self.num_kv_heads = len(shard.kv_heads(config))
        self.head_dim = config.head_dim
        self.comm = comm
        bias = config.attention_bias
        q_size, kv_size = self.num_heads * config.head_dim, self.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=bias)
        # The bias is added once, by slice 0, so the sum over slices carries it once.
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=bias and shard.tp_rank == 0)
        # Qwen3: one RMSNorm weight over head_dim, shared by all query (resp. key) heads.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        # q, k and v in one call, when the engine's twin fused them (prepack.py); q/k/v_proj are then unused.
        self.qkv_proj: nn.Module | None = None
        self.qkv_sizes = (q_size, kv_size, kv_size)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: PagedKVCache, rope: RopeTables) -> torch.Tensor:
        # x: [T, hidden]
        num_tokens = x.shape[0]
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.rotate(q), rope.rotate(k)
        # New K/V go to their pages first, so each sequence then reads one uniform context from the cache.
        kv_cache.write(self.layer_index, batch.slot_mapping, k, v)
        out = paged_attention(q, self.layer_index, batch, kv_cache)  # [T, Hq, D]
        return self.comm.tp_all_reduce(self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim)))


class MLP(nn.Module):
    """The dense SwiGLU MLP (every layer of Llama/Qwen3, the mlp-only layers of Qwen3-MoE), over this rank's columns."""

    def __init__(self, config: ModelConfig, shard: ModelShard = WHOLE, comm: Collectives = LOCAL):
        super().__init__()
        inner = len(shard.columns(config.intermediate_size))
        self.comm = comm
        self.gate_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.down_proj = nn.Linear(inner, config.hidden_size, bias=False)
        # gate and up in one call, when the engine's twin fused them (prepack.py); gate/up_proj are then unused.
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.comm.tp_all_reduce(self.down_proj(F.silu(gate) * up))  # SwiGLU, summed over the column slices


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, cache_layer: int, shard: ModelShard = WHOLE, comm: Collectives = LOCAL):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, cache_layer, shard, comm)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MLP | SparseMoeBlock = (
            SparseMoeBlock(config, shard, comm) if config.is_moe_layer(layer_index) else MLP(config, shard, comm)
        )

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: PagedKVCache, rope: RopeTables) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), batch, kv_cache, rope)
        h = self.post_attn_norm(x)
        return x + (self.mlp(h, batch.dp_counts) if isinstance(self.mlp, SparseMoeBlock) else self.mlp(h))


class CausalLM(nn.Module):
    """This rank's part of a model of any family of `ARCHITECTURES` (the whole model on a one-rank world).

    Parameter names are the whole model's (`layers.<global index>...`), so a shard's weights
    are read by name from any checkpoint. The first pipeline stage embeds, the last one
    computes logits; embedding and LM head hold this rank's vocabulary rows (shard.py).
    """

    def __init__(self, config: ModelConfig, shard: ModelShard = WHOLE, comm: Collectives = LOCAL):
        super().__init__()
        shard.check(config)
        self.config = config
        self.shard = shard
        self.comm = comm
        layers = shard.layers(config)
        vocab_rows = shard.vocab_rows_per_rank(config)
        tied = config.tie_word_embeddings
        needs_embedding = shard.is_first_stage or (shard.is_last_stage and tied)
        self.embed_tokens = nn.Embedding(vocab_rows, config.hidden_size) if needs_embedding else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i, i - layers.start, shard, comm) for i in layers})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if shard.is_last_stage else None
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)
        untied_head = shard.is_last_stage and not tied
        self.lm_head = nn.Linear(config.hidden_size, vocab_rows, bias=False) if untied_head else None
        self.vocab_start = shard.vocab(config).start

    @classmethod
    def from_state_dict(
        cls, config: ModelConfig, weights: dict[str, torch.Tensor], shard: ModelShard = WHOLE, comm: Collectives = LOCAL
    ) -> CausalLM:
        """Builds the model around `weights` (adopted, not copied; skips the random init of nn.Linear).

        A tensor that is not 64-byte aligned (a view into a safetensors file) is copied: CPU
        kernels take other SIMD paths on misaligned data, so the same weights would give
        logits that differ in the last bits depending on where they were read from.
        """
        with torch.device("meta"):
            model = cls(config, shard, comm)
        model.load_state_dict({name: _aligned(t) for name, t in weights.items()}, strict=True, assign=True)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def num_cache_layers(self) -> int:
        """Layers whose KV this rank keeps: its pipeline stage's."""
        return len(self.layers)

    @property
    def num_cache_heads(self) -> int:
        """KV heads this rank keeps: its tensor slice's."""
        return len(self.shard.kv_heads(self.config))

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.layers.values() if isinstance(layer.mlp, SparseMoeBlock)]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> [T, hidden]; vocab-parallel: each slice looks up its own rows, the sum is the embedding."""
        if self.shard.tp == 1:
            return self.embed_tokens(input_ids)
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.embed_tokens.num_embeddings)
        x = self.embed_tokens(local.clamp(0, self.embed_tokens.num_embeddings - 1)) * inside[:, None].to(self.dtype)
        return self.comm.tp_all_reduce(x)

    def run_layers(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: PagedKVCache) -> torch.Tensor:
        """This stage's layers over the batch's new tokens (their K/V written): [T, hidden] -> [T, hidden]."""
        rope = self.rotary.tables(batch.positions, x.dtype)
        for layer in self.layers.values():
            x = layer(x, batch, kv_cache, rope)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Last stage: hidden rows `[R, hidden]` -> float32 logits `[R, vocab]` on tensor slice 0, None on the others."""
        x = self.norm(x)
        if self.lm_head is None:  # tied to the embedding
            local = F.linear(x, self.embed_tokens.weight)
        else:
            local = self.lm_head(x)  # a module call, so the engine's packed twin can swap it (prepack.py)
        full = self.comm.tp_gather_last_dim(local.float())
        return None if full is None else full[:, : self.config.vocab_size]

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, kv_cache: PagedKVCache) -> torch.Tensor | None:
        """One pipeline stage holding every layer (pp=1): float32 logits `[num_seqs, vocab]` of last tokens (slice 0)."""
        # input_ids: [T]
        x = self.run_layers(self.embed(input_ids), batch, kv_cache)
        return self.logits(x[batch.last_token_index])  # the head only needs last tokens
