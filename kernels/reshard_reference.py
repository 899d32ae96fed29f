"""The re-shard's oracle: obviously-correct token-by-token versions, for tests and benchmarks.

The serving path (gather, scatter) lives in `shared.reshard`; these define what it must produce.
"""

from __future__ import annotations

import torch

from shared.kv_spec import KvSpec
from shared.layouts import Layout
from shared.reshard.buffers import check_cache
from shared.reshard.page_map import BlockTable


def write_dense(kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: KvSpec, block_table: BlockTable) -> None:
    """Writes KV `[L, 2, T, H, D]` token by token into a paged cache of `spec`, casting to its dtype."""
    page = spec.page_size
    for pos in range(kv.shape[2]):
        block, offset = int(block_table[pos // page]), pos % page
        for which, cache in ((0, key), (1, value)):
            rows = kv[:, which, pos].to(spec.dtype)  # [L, H, D]
            if spec.memory_layout == "NHD":
                cache[:, block, offset, :, :] = rows
            else:
                cache[:, block, :, offset, :] = rows


def read_dense(key: torch.Tensor, value: torch.Tensor, spec: KvSpec, block_table: BlockTable, num_tokens: int) -> torch.Tensor:
    """Token-by-token inverse of `write_dense`: `[L, 2, T, H, D]` in the cache dtype."""
    page = spec.page_size
    out = torch.empty((spec.num_layers, 2, num_tokens, spec.num_kv_heads, spec.head_dim), dtype=key.dtype)
    for pos in range(num_tokens):
        block, offset = int(block_table[pos // page]), pos % page
        for which, cache in ((0, key), (1, value)):
            if spec.memory_layout == "NHD":
                out[:, which, pos] = cache[:, block, offset, :, :]
            else:
                out[:, which, pos] = cache[:, block, :, offset, :]
    return out


def reference_reshard(
    kv: torch.Tensor, dst_spec: KvSpec, dst_key: torch.Tensor, dst_value: torch.Tensor, dst_block_table: BlockTable
) -> None:
    """The oracle: the decoder's DP group holds every layer and head, so the re-sharded cache
    is simply the dense KV written token by token into its pages (cast to its dtype)."""
    check_cache(dst_key, dst_value, dst_spec, "destination cache")
    write_dense(kv, dst_key, dst_value, dst_spec, dst_block_table)


def reference_shards(kv: torch.Tensor, dst_layout: Layout, dst_spec: KvSpec, dst_dp_group: int = 0) -> dict[int, torch.Tensor]:
    """The oracle per rank: what each rank of the DP group holds, straight from the layout rules."""
    shards = {}
    for rank in dst_layout.group_ranks(dst_dp_group):
        coord = dst_layout.coord(rank)
        layers = dst_layout.layers_of(coord.pp, dst_spec.num_layers)
        heads = dst_layout.kv_heads_of(coord.tp, dst_spec.num_kv_heads)
        shards[rank] = kv[layers.start : layers.stop, :, :, heads.start : heads.stop].to(dst_spec.dtype)
    return shards
