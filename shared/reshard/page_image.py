"""One layer's K (or V) of a request laid out exactly as a paged cache's pages, in request
order: the staging step of the re-shard between wire pieces and cache pages.

Wire pieces are token-major `[T, heads, D]` with a subset of the heads; a cache page is
`[page, H, D]` (NHD) or `[H, page, D]` (HND) with all of them. Moving a piece straight
into the pages means one small strided write per token and head (e.g. 256 bytes, spread
over every page), which is slow on a CPU. Instead the pieces are copied into a
`LayerImage` (strided but sequential copies, casting on the way), and the image moves to
the cache one whole page per `memcpy` (`PageMap`).

Where a piece already is whole pages in the cache's order (`is_page_slab`) and no cast is
needed, it moves straight to or from the cache pages, with no image (`write_piece` /
`read_piece`).

Storage: NHD `[T, H, D]` (token-major: page `p` is rows `[p * page, (p + 1) * page)`, so
the image is also the dense KV of the layer); HND `[pages, H, page, D]` with the tail page
padded.
"""

from __future__ import annotations

import torch

from shared.reshard.page_map import PageMap, pages_needed
from shared.kv_spec import KvSpec


def image_numel(spec: KvSpec, num_tokens: int) -> int:
    """Elements of one layer image (K or V) of a `num_tokens` request."""
    tokens = num_tokens if spec.memory_layout == "NHD" else pages_needed(num_tokens, spec.page_size) * spec.page_size
    return tokens * spec.num_kv_heads * spec.head_dim


def cache_rows(cache_layer: torch.Tensor) -> torch.Tensor:
    """`[blocks, page elements]`: each page of a (contiguous) cache layer as one row."""
    return cache_layer.view(cache_layer.shape[0], -1)


def tail_tokens(cache_layer: torch.Tensor, spec: KvSpec, block: int, tokens: int) -> torch.Tensor:
    """`[tokens, H, D]`: the first `tokens` slots of page `block` of a cache layer, token-major."""
    if spec.memory_layout == "NHD":
        return cache_layer[block, :tokens]
    return cache_layer[block, :, :tokens].transpose(0, 1)


def is_page_slab(spec: KvSpec, heads: range) -> bool:
    """True when a wire piece of `heads` holds whole cache pages, each one contiguous slab in
    the cache's order (every head, and NHD or one head or one-token pages): it can move
    page by page with no image. (A piece of some heads only would write part of each page,
    spread over the layer: slower than going through the image.)"""
    whole = len(heads) == spec.num_kv_heads
    return whole and (spec.memory_layout == "NHD" or spec.num_kv_heads == 1 or spec.page_size == 1)


def slab_rows(cache_layer: torch.Tensor, spec: KvSpec, heads: range) -> torch.Tensor:
    """`[blocks, page * len(heads) * D]`: each block's slab of `heads` (only when `is_page_slab`)."""
    head_dim = 2 if spec.memory_layout == "NHD" else 1
    pages = cache_layer.narrow(head_dim, heads.start, len(heads))
    return pages.view(pages.shape[0], _slab_numel(spec, heads))


def _slab_numel(spec: KvSpec, heads: range) -> int:
    return spec.page_size * len(heads) * spec.head_dim


def write_piece(rows: torch.Tensor, heads: range, cache_layer: torch.Tensor, spec: KvSpec, pages: PageMap) -> None:
    """Wire rows `[T, heads, D]` straight into the cache pages (same dtype, `is_page_slab`)."""
    full = pages.num_full * spec.page_size
    pages.write(rows[:full].view(pages.num_full, _slab_numel(spec, heads)), slab_rows(cache_layer, spec, heads))
    if pages.tail_block is not None:
        tail = tail_tokens(cache_layer, spec, pages.tail_block, pages.tail_tokens)
        tail[:, heads.start : heads.stop].copy_(rows[full:])


def read_piece(cache_layer: torch.Tensor, spec: KvSpec, pages: PageMap, heads: range, out: torch.Tensor) -> None:
    """Inverse of `write_piece`: the cache pages' `heads` into wire rows `out` `[T, heads, D]`."""
    full = pages.num_full * spec.page_size
    pages.read(slab_rows(cache_layer, spec, heads), out[:full].view(pages.num_full, _slab_numel(spec, heads)))
    if pages.tail_block is not None:
        tail = tail_tokens(cache_layer, spec, pages.tail_block, pages.tail_tokens)
        out[full:].copy_(tail[:, heads.start : heads.stop])


class LayerImage:
    """A request's K or V of one layer in the cache's page layout (see the module docstring)."""

    def __init__(self, storage: torch.Tensor, spec: KvSpec, num_tokens: int):
        heads, dim, page = spec.num_kv_heads, spec.head_dim, spec.page_size
        self.spec, self.num_tokens = spec, num_tokens
        self.num_full, self.tail = divmod(num_tokens, page)
        flat = storage[: image_numel(spec, num_tokens)]
        if spec.memory_layout == "NHD":
            self.data = flat.view(num_tokens, heads, dim)
        else:
            self.data = flat.view(pages_needed(num_tokens, page), heads, page, dim)

    @classmethod
    def empty(cls, spec: KvSpec, num_tokens: int, device: torch.device | str = "cpu") -> LayerImage:
        return cls(torch.empty(image_numel(spec, num_tokens), dtype=spec.dtype, device=device), spec, num_tokens)

    def full_pages(self) -> torch.Tensor:
        """`[num_full, page elements]`: the full pages as rows, exactly as the cache stores them."""
        width = self.spec.page_size * self.spec.num_kv_heads * self.spec.head_dim
        if self.spec.memory_layout == "NHD":
            return self.data[: self.num_full * self.spec.page_size].view(self.num_full, width)
        return self.data[: self.num_full].view(self.num_full, width)

    def token_views(self) -> list[tuple[torch.Tensor, int, int]]:
        """`(view, t0, t1)`: views indexed `[token, head, dim]` (the first dims flattening to
        tokens `[t0, t1)`), covering every token of the request."""
        if self.spec.memory_layout == "NHD":
            return [(self.data, 0, self.num_tokens)]
        page = self.spec.page_size
        full = self.num_full * page
        views = [(self.data[: self.num_full].transpose(1, 2), 0, full)] if self.num_full else []
        if self.tail:
            views.append((self.tail_view(), full, self.num_tokens))
        return views

    def fill(self, rows: torch.Tensor, heads: range) -> None:
        """Wire rows `[T, len(heads), D]` into the image's `heads` (cast to the image dtype)."""
        for view, t0, t1 in self.token_views():
            part = rows[t0:t1]
            view[..., heads.start : heads.stop, :].copy_(part.view(*view.shape[:-2], len(heads), part.shape[-1]))

    def tail_view(self) -> torch.Tensor:
        """`[tail, H, D]`: the tail page's filled slots, token-major."""
        if self.spec.memory_layout == "NHD":
            return self.data[self.num_full * self.spec.page_size :]
        return self.data[self.num_full, :, : self.tail].transpose(0, 1)

    def write_to(self, cache_layer: torch.Tensor, pages: PageMap) -> None:
        """The image into the cache pages: whole pages, then only the tail page's filled slots."""
        pages.write(self.full_pages(), cache_rows(cache_layer))
        if pages.tail_block is not None:
            tail_tokens(cache_layer, self.spec, pages.tail_block, pages.tail_tokens).copy_(self.tail_view())

    def read_from(self, cache_layer: torch.Tensor, pages: PageMap) -> None:
        """Inverse of `write_to`: the request's pages of a cache layer into the image."""
        pages.read(cache_rows(cache_layer), self.full_pages())
        if pages.tail_block is not None:
            self.tail_view().copy_(tail_tokens(cache_layer, self.spec, pages.tail_block, pages.tail_tokens))
