"""Where a request's pages sit in a paged cache, and whole-page moves between them and a
request-ordered copy.

A request of `T` tokens fills `T // page` full pages and maybe one partly filled tail page
(`block_table[p]` holds tokens `[p * page, (p + 1) * page)`). Full pages move as rows of
2-D views, `[blocks, W]` on the cache side (a page's slab, contiguous, `W` elements) and
`[full pages, W]` on the request side, so one call moves every page and each page is one
`memcpy` (CPU `index_select` copies contiguous rows that way, whatever the row stride):

- `read` gathers rows by block id: one `index_select`, any block table;
- `write` sorts the block ids into runs of consecutive ids and fills each run with one
  `index_select` into a slice of the cache (in-order writes; much faster on CPU than
  `index_copy_`, which a badly fragmented table falls back to).

The tail page is the caller's: it needs a strided copy of its filled slots only, so the
cells past the last token stay untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BlockTable = Sequence[int] | torch.Tensor

# `write` falls back to one `index_copy_` when the sorted block ids break into more runs
# than this: each run is one call, and calls cost microseconds each.
MAX_WRITE_RUNS = 32


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def block_list(block_table: BlockTable, num_tokens: int, page_size: int) -> list[int]:
    """The block ids holding tokens [0, num_tokens), as Python ints."""
    needed = pages_needed(num_tokens, page_size)
    if len(block_table) < needed:
        raise ValueError(f"block table has {len(block_table)} pages; {num_tokens} tokens of page size {page_size} need {needed}")
    head = block_table[:needed]
    return head.tolist() if isinstance(head, torch.Tensor) else [int(b) for b in head]


class PageMap:
    """A request's pages in one paged cache: the full pages' block ids and the tail page's."""

    def __init__(self, block_table: BlockTable, num_tokens: int, page_size: int, device: torch.device):
        blocks = block_list(block_table, num_tokens, page_size)
        self.page_size = page_size
        self.num_full, self.tail_tokens = divmod(num_tokens, page_size)
        self.full_blocks = torch.tensor(blocks[: self.num_full], dtype=torch.long, device=device)
        self.tail_block = blocks[self.num_full] if self.tail_tokens else None
        self._runs: tuple[torch.Tensor, list[tuple[int, int, int]]] | None = None
        self._fragmented = False

    def read(self, cache_rows: torch.Tensor, out: torch.Tensor) -> None:
        """Full pages, `cache_rows` `[blocks, W]` -> `out` `[num_full, W]` in request order."""
        torch.index_select(cache_rows, 0, self.full_blocks, out=out)

    def write(self, pages: torch.Tensor, cache_rows: torch.Tensor) -> None:
        """Full pages, `pages` `[num_full, W]` in request order -> their rows of `cache_rows` `[blocks, W]`."""
        runs = self._write_runs()
        if runs is None:
            cache_rows.index_copy_(0, self.full_blocks, pages)
            return
        order, spans = runs
        for start, stop, first_block in spans:
            torch.index_select(pages, 0, order[start:stop], out=cache_rows[first_block : first_block + stop - start])

    def _write_runs(self) -> tuple[torch.Tensor, list[tuple[int, int, int]]] | None:
        """`(order, [(start, stop, first block)])`: pages `order[start:stop]` go to consecutive blocks."""
        if self._runs is None and not self._fragmented:
            sorted_blocks, order = torch.sort(self.full_blocks, stable=True)
            breaks = (torch.nonzero(sorted_blocks[1:] - sorted_blocks[:-1] != 1).flatten() + 1).tolist()
            if len(breaks) >= MAX_WRITE_RUNS:
                self._fragmented = True
                return None
            bounds = [0, *breaks, self.num_full]
            firsts = sorted_blocks[bounds[:-1]].tolist() if self.num_full else []
            self._runs = (order, [(bounds[i], bounds[i + 1], firsts[i]) for i in range(len(bounds) - 1) if bounds[i] < bounds[i + 1]])
        return self._runs
