"""Attention over the paged KV cache, for a batch of sequences (prefill chunks and decodes).

Kept apart from the model so the kernel can change (a Triton/CUDA path) without touching
the model families that call it. Two paths:
- decodes: all of them in two batched matmuls and a softmax. With one query per sequence,
  grouped-query attention folds into the query axis (the G query heads of a KV head are
  G queries against it), so no K/V head is repeated; contexts are padded to the longest
  and the padding masked. The cache's head-major pages gather into `[H, B, S, D]`, whose
  `[S, D]` matrices batched matmuls read in place.
- prefill chunks: torch's fused causal SDPA, one call each (a chunk amortises the call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.engine.batch import DecodeGroup, ForwardBatch, PrefillSpan
from shared.engine.kv_cache import PagedKVCache


def paged_attention(q: torch.Tensor, layer_index: int, batch: ForwardBatch, kv_cache: PagedKVCache) -> torch.Tensor:
    """q: [T, Hq, D] for the batch's new tokens (their K/V already written) -> [T, Hq, D]."""
    decode, prefills = batch.decode, batch.prefills
    if decode is not None and not prefills:
        return _attend_decodes(q, decode, layer_index, kv_cache)
    if decode is None and len(prefills) == 1 and prefills[0].num_new == q.shape[0]:
        return _attend_prefill(q, prefills[0], layer_index, kv_cache)
    out = torch.empty_like(q)
    if decode is not None:
        out[decode.rows] = _attend_decodes(q[decode.rows], decode, layer_index, kv_cache)
    for span in prefills:
        rows = slice(span.start, span.start + span.num_new)
        out[rows] = _attend_prefill(q[rows], span, layer_index, kv_cache)
    return out


def _attend_decodes(q: torch.Tensor, group: DecodeGroup, layer_index: int, kv_cache: PagedKVCache) -> torch.Tensor:
    # q: [B, Hq, D] -> [B, Hq, D]
    batch, num_heads, head_dim = q.shape
    if group.run is not None:  # one sequence in consecutive pages: its context as a view, no padding
        key, value = (t[:, None] for t in kv_cache.read_run(layer_index, group.run.first_slot, group.run.length))
        bias = None
    else:
        key, value = kv_cache.read_pages(layer_index, group.pages)  # [Hkv, B, S, D]
        bias = group.bias  # [1, B, 1, S]
    num_kv_heads = key.shape[0]
    # Query head h uses KV head h // G (HF's repeat_kv): [Hkv, B, G, D], G queries per KV head.
    queries = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1).float()
    if bias is None:  # one sequence: the fused kernel is one call instead of five (measured faster only here)
        out = F.scaled_dot_product_attention(queries, key.float(), value.float())  # [Hkv, 1, G, D]
    else:
        scores = torch.matmul(queries, key.float().transpose(-1, -2)).mul_(head_dim**-0.5)  # [Hkv, B, G, S]
        scores += bias
        out = torch.matmul(torch.softmax(scores, dim=-1), value.float())  # [Hkv, B, G, D], float32 like SDPA's accumulation
    return out.transpose(0, 1).reshape(batch, num_heads, head_dim).to(q.dtype)


def _attend_prefill(q: torch.Tensor, span: PrefillSpan, layer_index: int, kv_cache: PagedKVCache) -> torch.Tensor:
    # q: [n, Hq, D] -> [n, Hq, D]
    num_heads = q.shape[1]
    if span.run is not None:
        key, value = kv_cache.read_run(layer_index, span.run.first_slot, span.run.length)  # [Hkv, S, D] views
    else:
        key, value = kv_cache.read_pages(layer_index, span.pages)  # [Hkv, 1, P * block_size, D]
        key, value = key[:, 0, : span.context_len], value[:, 0, : span.context_len]  # [Hkv, S, D]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, Hq, n, D]: 4-D, so the fused (flash) kernel takes it
        key.to(q.dtype)[None],  # [1, Hkv, S, D]
        value.to(q.dtype)[None],
        attn_mask=span.mask,  # [n, S], or None with is_causal (the chunk is the whole context)
        is_causal=span.mask is None,
        enable_gqa=num_heads != key.shape[0],  # query head h uses KV head h // (Hq / Hkv), as HF's repeat_kv
    )
    return out[0].transpose(0, 1)
