"""Attention over the paged KV cache, for a batch of sequences (prefill chunks and decodes).

Kept apart from the model so the kernel can change (batched decode, chunked prefill,
a Triton/CUDA path) without touching the model families that call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.engine.batch import ForwardBatch
from shared.engine.kv_cache import PagedKVCache


def paged_attention(q: torch.Tensor, layer_index: int, batch: ForwardBatch, kv_cache: PagedKVCache) -> torch.Tensor:
    """q: [T, Hq, D] for the batch's new tokens (K/V already written) -> [T, Hq, D]."""
    return torch.cat([_attend_one(q_seq, i, layer_index, batch, kv_cache) for i, q_seq in enumerate(q.split(batch.num_new))])


def _attend_one(q: torch.Tensor, index: int, layer_index: int, batch: ForwardBatch, kv_cache: PagedKVCache) -> torch.Tensor:
    # q: [n, Hq, D] -> [n, Hq, D]
    key, value = kv_cache.read(layer_index, batch.context_slots[index])  # [S, Hkv, D]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),  # [Hq, n, D]
        key.to(q.dtype).transpose(0, 1),  # [Hkv, S, D]
        value.to(q.dtype).transpose(0, 1),
        attn_mask=batch.attn_masks[index],  # [n, S]
        enable_gqa=True,  # query head h uses KV head h // (Hq / Hkv), as in HF's repeat_kv
    )
    return out.transpose(0, 1)
