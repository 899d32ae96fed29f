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
from shared.engine.moe import ExpertPlacement, SparseMoeBlock


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


def _check_ep(config: ModelConfig, ep: int) -> None:
    if ep != 1 and config.num_experts == 0:
        raise ValueError(f"ep={ep}: a dense {config.architecture} model has no experts to place (use ep=1)")


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=bias)
        # Qwen3: one RMSNorm weight over head_dim, shared by all query (resp. key) heads.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        # q, k and v in one call, when the engine's twin fused them (prepack.py); q/k/v_proj are then unused.
        self.qkv_proj: nn.Module | None = None
        self.qkv_sizes = (config.num_heads * config.head_dim, *[config.num_kv_heads * config.head_dim] * 2)

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
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """The dense SwiGLU MLP (every layer of Llama/Qwen3, the mlp-only layers of Qwen3-MoE)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        # gate and up in one call, when the engine's twin fused them (prepack.py); gate/up_proj are then unused.
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, ep: int = 1):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_index)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MLP | SparseMoeBlock = SparseMoeBlock(config, ep) if config.is_moe_layer(layer_index) else MLP(config)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: PagedKVCache, rope: RopeTables) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), batch, kv_cache, rope)
        return x + self.mlp(self.post_attn_norm(x))


class CausalLM(nn.Module):
    """Any family of `ARCHITECTURES`; `ep` places the experts of MoE layers on virtual EP ranks."""

    def __init__(self, config: ModelConfig, ep: int = 1):
        super().__init__()
        _check_ep(config, ep)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, ep) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)
        untied = not config.tie_word_embeddings
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if untied else None

    @classmethod
    def from_state_dict(cls, config: ModelConfig, weights: dict[str, torch.Tensor], ep: int = 1) -> CausalLM:
        """Builds the model around `weights` (adopted, not copied; skips the random init of nn.Linear).

        A tensor that is not 64-byte aligned (a view into a safetensors file) is copied: CPU
        kernels take other SIMD paths on misaligned data, so the same weights would give
        logits that differ in the last bits depending on where they were read from.
        """
        with torch.device("meta"):
            model = cls(config, ep)
        model.load_state_dict({name: _aligned(t) for name, t in weights.items()}, strict=True, assign=True)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def expert_placement(self) -> ExpertPlacement | None:
        """Where the experts live (the same for every MoE layer); None for a dense model."""
        blocks = self.moe_blocks()
        return blocks[0].placement if blocks else None

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoeBlock)]

    def set_ep(self, ep: int) -> None:
        """Re-places the experts on `ep` virtual ranks (ep must divide num_experts; 1 for dense models)."""
        _check_ep(self.config, ep)
        for block in self.moe_blocks():
            block.set_ep(ep)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, kv_cache: PagedKVCache) -> torch.Tensor:
        """Runs the batch's new tokens and writes their K/V; float32 logits `[num_seqs, vocab]` of last tokens."""
        # input_ids: [T]
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rotary.tables(batch.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, batch, kv_cache, rope)
        x = self.norm(x[batch.last_token_index])  # [num_seqs, hidden]: the head only needs last tokens
        if self.lm_head is None:  # tied to the embedding
            return F.linear(x, self.embed_tokens.weight).float()  # [num_seqs, vocab]
        return self.lm_head(x).float()  # a module call, so the engine's packed twin can swap it (prepack.py)
