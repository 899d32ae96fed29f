"""One forward pass's worth of work: new tokens of several sequences, flattened, plus where their KV lives.

Sequence i contributes `num_new[i]` consecutive tokens to the flat input, at positions
`num_cached[i] .. num_cached[i] + num_new[i] - 1`; a prefill has num_cached == 0 and a
decode step has num_new == 1, and a batch may mix both (and chunks of long prompts).

The metadata is built once per pass, with a handful of tensor ops whatever the batch
size, and read by every layer's attention:
- every one-token chunk (decodes) goes into one `DecodeGroup`, attended in one call;
- every longer chunk (prefills) gets a `PrefillSpan` of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's part of a forward pass."""

    block_table: list[int]  # pages holding this sequence's KV, in position order
    num_cached: int  # tokens whose K/V are already in the cache
    num_new: int  # tokens fed in this pass
    wants_logits: bool = True  # False for a prompt chunk that is not the prompt's last

    def __post_init__(self) -> None:
        if self.num_cached < 0 or self.num_new <= 0:
            raise ValueError(f"need num_cached >= 0 and num_new > 0, got {self.num_cached}, {self.num_new}")

    @property
    def context_len(self) -> int:
        return self.num_cached + self.num_new


@dataclass(frozen=True)
class DecodeGroup:
    """The one-token chunks, attended together: each row's query against its own padded context."""

    rows: slice | torch.Tensor  # their rows in the flat batch: a slice when consecutive, else [B] int64
    pages: torch.Tensor  # [B, P] int64: pages covering the longest context; padding repeats a real page
    bias: torch.Tensor  # [1, B, 1, P * block_size] float32, added to scores: 0 in a row's context, -inf past it
    run: ContiguousRun | None = None  # a single row whose context sits in consecutive pages: read as a view


@dataclass(frozen=True)
class ContiguousRun:
    """A context held in consecutive pages: cache slots first_slot .. first_slot + length - 1."""

    first_slot: int
    length: int


@dataclass(frozen=True)
class PrefillSpan:
    """A chunk of several new tokens of one sequence, rows `start .. start + num_new - 1`."""

    start: int
    num_new: int
    num_cached: int
    pages: torch.Tensor  # [1, P] int64: pages covering positions 0 .. num_cached + num_new - 1
    mask: torch.Tensor | None  # [num_new, context] bool; None when num_cached == 0 (plain causal)
    run: ContiguousRun | None = None  # set when those pages are consecutive: read as a view

    @property
    def context_len(self) -> int:
        return self.num_cached + self.num_new


@dataclass(frozen=True)
class ForwardBatch:
    positions: torch.Tensor  # [T] int64: absolute position of each new token
    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to
    num_new: list[int]  # per sequence; sums to T
    last_token_index: torch.Tensor  # [R] int64: rows whose logits the model returns (last token of each chunk wanting them)
    decode: DecodeGroup | None
    prefills: tuple[PrefillSpan, ...]
    dp_counts: tuple[int, ...] | None = None  # data-parallel attention: tokens of every DP group this pass (MoE layers gather them)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @classmethod
    def build(cls, chunks: list[SequenceChunk], block_size: int, dp_counts: tuple[int, ...] | None = None) -> ForwardBatch:
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence")
        for chunk in chunks:
            if len(chunk.block_table) * block_size < chunk.context_len:
                raise ValueError(f"block table of {len(chunk.block_table)} pages cannot hold {chunk.context_len} tokens")
        num_new = [c.num_new for c in chunks]
        pages = _page_matrix(chunks, block_size)  # [N, P]
        counts = torch.tensor(num_new, dtype=torch.int64)  # [N]
        ends = counts.cumsum(0)  # [N]: one past each chunk's last row
        seq_of_row = torch.repeat_interleave(torch.arange(len(chunks)), counts, output_size=int(ends[-1]))  # [T]
        row_in_chunk = torch.arange(seq_of_row.shape[0]) - (ends - counts)[seq_of_row]  # [T]
        cached = torch.tensor([c.num_cached for c in chunks], dtype=torch.int64)
        positions = cached[seq_of_row] + row_in_chunk  # [T]
        slots = pages[seq_of_row, positions // block_size] * block_size + positions % block_size
        wants = [i for i, c in enumerate(chunks) if c.wants_logits]
        last = (ends - 1) if len(wants) == len(chunks) else (ends - 1)[wants]
        return cls(
            positions=positions,
            slot_mapping=slots,
            num_new=num_new,
            last_token_index=last,
            decode=_decode_group(chunks, pages, ends, block_size),
            prefills=tuple(_prefill_spans(chunks, pages, ends, block_size)),
            dp_counts=dp_counts,
        )


def _page_matrix(chunks: list[SequenceChunk], block_size: int) -> torch.Tensor:
    """[N, P] int64: each chunk's pages up to its context, padded with its first page."""
    needed = [-(-c.context_len // block_size) for c in chunks]
    width = max(needed)
    rows = [c.block_table[:n] + [c.block_table[0]] * (width - n) for c, n in zip(chunks, needed)]
    return torch.tensor(rows, dtype=torch.int64)


def _decode_group(chunks: list[SequenceChunk], pages: torch.Tensor, ends: torch.Tensor, block_size: int) -> DecodeGroup | None:
    index = [i for i, c in enumerate(chunks) if c.num_new == 1]
    if not index:
        return None
    context = torch.tensor([chunks[i].context_len for i in index], dtype=torch.int64)  # [B]
    width = -(-int(context.max()) // block_size)
    if index == list(range(len(index))):  # the usual order: decodes first, at rows 0 .. B-1
        rows: slice | torch.Tensor = slice(0, len(index))
        group_pages = pages[: len(index), :width]
    else:
        rows = (ends - 1)[index]
        group_pages = pages[index, :width]
    padding = torch.arange(width * block_size)[None, :] >= context[:, None]  # [B, S]
    bias = torch.zeros(padding.shape).masked_fill_(padding, float("-inf"))
    run = _contiguous_run(chunks[index[0]], block_size) if len(index) == 1 else None
    return DecodeGroup(rows, group_pages.contiguous(), bias[None, :, None, :], run)


def _prefill_spans(chunks: list[SequenceChunk], pages: torch.Tensor, ends: torch.Tensor, block_size: int) -> list[PrefillSpan]:
    spans = []
    starts = (ends - torch.tensor([c.num_new for c in chunks])).tolist()
    for i, chunk in enumerate(chunks):
        if chunk.num_new == 1:
            continue
        width = -(-chunk.context_len // block_size)
        mask = None if chunk.num_cached == 0 else causal_mask(chunk.num_cached, chunk.num_new)
        run = _contiguous_run(chunk, block_size)
        spans.append(PrefillSpan(starts[i], chunk.num_new, chunk.num_cached, pages[i : i + 1, :width], mask, run))
    return spans


def _contiguous_run(chunk: SequenceChunk, block_size: int) -> ContiguousRun | None:
    num_pages = -(-chunk.context_len // block_size)
    first = chunk.block_table[0]
    if chunk.block_table[:num_pages] != list(range(first, first + num_pages)):
        return None
    return ContiguousRun(first * block_size, chunk.context_len)


def causal_mask(num_cached: int, num_new: int) -> torch.Tensor:
    """New token j (at position num_cached + j) sees every position up to and including its own."""
    key_pos = torch.arange(num_cached + num_new)  # [S]
    query_pos = torch.arange(num_new) + num_cached  # [n]
    return key_pos[None, :] <= query_pos[:, None]  # [n, S]
