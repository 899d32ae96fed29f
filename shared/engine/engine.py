"""The synchronous model engine a worker drives: prefill, KV export/import, batched decode steps.

Life cycle of a request (one `_Sequence`):
  prefill(prompt) or add_prefilled(prompt KV, first token)  -> running, blocks reserved
  step() ... step()   -> one token per call, until "stop" or "length" -> finished
  free() / abort()    -> blocks back to the allocator
A finished sequence keeps its blocks (so a prefill worker can still export_kv) until the
caller frees it; free is idempotent, and abort is free under the name a cancel path uses.

Blocks for prompt + max_tokens are reserved at admission, so a running sequence never
runs out of cache mid-decode and no preemption is needed.

Threading: commands (prefill, add_prefilled, step, export_kv, free) must all run on one
thread; the read-only queries (num_running, num_free_blocks, can_admit, ...) read
snapshots and may be polled from another (an event loop's heartbeat).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from shared.engine.batch import ForwardBatch, SequenceChunk
from shared.engine.kv_cache import BlockAllocator, PagedKVCache, blocks_needed, slot_mapping
from shared.engine.loader import LoadedModel
from shared.engine.sampling import RequestSampler, SamplingParams


class KvCapacityError(ValueError):
    """The request (prompt + max_tokens) can never fit this engine's KV cache."""


class KvCacheFullError(RuntimeError):
    """The request would fit, but not while others hold the cache: retry after some finish."""


@dataclass(frozen=True)
class TokenOutput:
    request_id: str
    token_id: int
    finish_reason: str | None  # "stop" (EOS or a stop token), "length" (max_tokens), None (more to come)


@dataclass
class _Sequence:
    request_id: str
    num_prompt_tokens: int
    block_table: list[int]
    sampler: RequestSampler
    output_ids: list[int] = field(default_factory=list)  # generated tokens, the first included
    num_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None

    @property
    def running(self) -> bool:
        return self.finish_reason is None


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        kv_cache_tokens: int = 16384,
        block_size: int = 16,
        kv_dtype: torch.dtype | None = None,
    ):
        """`kv_cache_tokens`: the cache budget, rounded down to whole blocks. `kv_dtype`: defaults to the weights'."""
        if block_size <= 0 or kv_cache_tokens < block_size:
            raise ValueError(f"need 0 < block_size <= kv_cache_tokens, got {block_size} and {kv_cache_tokens}")
        self.loaded = loaded
        self.config = loaded.config
        self.model = loaded.model
        num_blocks = kv_cache_tokens // block_size
        self.kv_cache = PagedKVCache(self.config, num_blocks, block_size, kv_dtype or self.model.dtype)
        self.allocator = BlockAllocator(num_blocks)
        self._sequences: dict[str, _Sequence] = {}

    # -- queries ---------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.kv_cache.dtype

    @property
    def max_tokens(self) -> int:
        """Tokens the whole cache holds: the most one request (prompt + max_tokens) may reserve."""
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's K and V take across all layers (what a hand-off moves per token)."""
        c = self.config
        return c.num_layers * 2 * c.num_kv_heads * c.head_dim * self.kv_dtype.itemsize

    @property
    def num_sequences(self) -> int:
        """Requests holding KV here: running, finished but not yet freed."""
        return len(self._sequences)

    def holds(self, request_id: str) -> bool:
        return request_id in self._sequences

    @property
    def num_running(self) -> int:
        # tuple(): one C-level copy, so a concurrent insert cannot break the iteration.
        return sum(seq.running for seq in tuple(self._sequences.values()))

    def fits_budget(self, num_tokens: int) -> bool:
        """Whether a request reserving `num_tokens` (prompt + max_tokens) could ever be admitted."""
        return blocks_needed(num_tokens, self.block_size) <= self.num_blocks

    def can_admit(self, num_tokens: int) -> bool:
        """Whether a request reserving `num_tokens` (prompt + max_tokens) can be admitted now."""
        return self.allocator.can_allocate(blocks_needed(num_tokens, self.block_size))

    # -- commands --------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> TokenOutput:
        """Runs the prompt, keeps its KV, samples the first token. The sequence then runs in step()."""
        self._check_token_ids(prompt_ids)
        seq = self._admit(request_id, len(prompt_ids), sampling)
        logits = self._forward([seq], [SequenceChunk(seq.block_table, 0, len(prompt_ids))], prompt_ids)
        return self._sample_and_append(seq, logits[0])

    def prefill_and_export(
        self, request_id: str, prompt_ids: list[int], sampling: SamplingParams
    ) -> tuple[TokenOutput, torch.Tensor]:
        """Prefill side of a hand-off in one call: prefill, export_kv, free.

        Running the three as separate calls leaves a window in which a step() on the same
        engine (a role=both worker) decodes the sequence, or frees it when it finishes.
        """
        try:
            first = self.prefill(request_id, prompt_ids, sampling)
            return first, self.export_kv(request_id)
        finally:
            self.free(request_id)

    def export_kv(self, request_id: str) -> torch.Tensor:
        """A new contiguous `[num_layers, 2, num_prompt_tokens, num_kv_heads, head_dim]` (K then V) tensor."""
        seq = self._get(request_id)
        return self.kv_cache.export(self._slots(seq, seq.num_prompt_tokens))

    def add_prefilled(
        self,
        request_id: str,
        prompt_ids: Sequence[int] | int,
        first_token: int,
        kv: torch.Tensor,
        sampling: SamplingParams,
    ) -> None:
        """Decode side of a hand-off: adopts a prompt's KV and first token; step() produces token 2 onwards.

        `prompt_ids` may be the ids or just their count: the KV already carries the prompt.
        """
        num_prompt = prompt_ids if isinstance(prompt_ids, int) else len(prompt_ids)
        self._check_token_ids([first_token])
        expected = (self.config.num_layers, 2, num_prompt, self.config.num_kv_heads, self.config.head_dim)
        if tuple(kv.shape) != expected:
            raise ValueError(f"KV for {request_id!r} has shape {tuple(kv.shape)}, expected {expected}")
        seq = self._admit(request_id, num_prompt, sampling)
        self.kv_cache.load(self._slots(seq, num_prompt), kv)
        seq.num_cached = num_prompt
        # The first token was sampled on the prefill side as generated index 0; ours continue from 1.
        self._append(seq, first_token)

    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        """One token for every running sequence, in one batched forward pass."""
        running = [seq for seq in self._sequences.values() if seq.running]
        if not running:
            return []
        chunks = [SequenceChunk(seq.block_table, seq.num_cached, 1) for seq in running]
        logits = self._forward(running, chunks, [seq.output_ids[-1] for seq in running])
        return [self._sample_and_append(seq, row) for seq, row in zip(running, logits)]

    def free(self, request_id: str) -> None:
        """Releases the request's blocks; unknown or already freed ids are ignored."""
        seq = self._sequences.pop(request_id, None)
        if seq is not None:
            self.allocator.free(seq.block_table)

    def abort(self, request_id: str) -> None:
        """Stops a request wherever it is and releases its blocks (same as free)."""
        self.free(request_id)

    # -- internals -------------------------------------------------------------------------

    def _get(self, request_id: str) -> _Sequence:
        try:
            return self._sequences[request_id]
        except KeyError:
            raise KeyError(f"no sequence {request_id!r} in this engine") from None

    def _check_token_ids(self, token_ids: Sequence[int]) -> None:
        if not token_ids:
            raise ValueError("prompt must hold at least one token")
        bad = [t for t in token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")

    def _admit(self, request_id: str, num_prompt: int, sampling: SamplingParams) -> _Sequence:
        if request_id in self._sequences:
            raise ValueError(f"request {request_id!r} is already in this engine")
        if num_prompt <= 0:
            raise ValueError("prompt must hold at least one token")
        reserved = num_prompt + sampling.max_tokens
        if reserved > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt ({num_prompt}) + max_tokens ({sampling.max_tokens}) = {reserved} exceeds "
                f"the model's context of {self.config.max_position_embeddings} tokens"
            )
        if not self.fits_budget(reserved):
            raise KvCapacityError(
                f"prompt ({num_prompt}) + max_tokens ({sampling.max_tokens}) = {reserved} tokens can never fit "
                f"this engine's KV cache of {self.max_tokens} tokens ({self.num_blocks} blocks of {self.block_size})"
            )
        if not self.can_admit(reserved):
            raise KvCacheFullError(
                f"{reserved} tokens need {blocks_needed(reserved, self.block_size)} blocks; "
                f"{self.num_free_blocks} of {self.num_blocks} are free now"
            )
        blocks = self.allocator.allocate(blocks_needed(reserved, self.block_size))
        seq = _Sequence(request_id, num_prompt, blocks, RequestSampler(sampling))
        self._sequences[request_id] = seq
        return seq

    def _slots(self, seq: _Sequence, num_tokens: int) -> torch.Tensor:
        # Flat cache slots of positions 0 .. num_tokens - 1: [num_tokens]
        table = torch.tensor(seq.block_table, dtype=torch.int64)
        return slot_mapping(table, torch.arange(num_tokens), self.block_size)

    def _forward(self, seqs: list[_Sequence], chunks: list[SequenceChunk], input_ids: list[int]) -> torch.Tensor:
        batch = ForwardBatch.build(chunks, self.block_size)
        logits = self.model(torch.tensor(input_ids, dtype=torch.int64), batch, self.kv_cache)  # [num_seqs, vocab]
        for seq, chunk in zip(seqs, chunks):
            seq.num_cached += chunk.num_new
        return logits

    def _sample_and_append(self, seq: _Sequence, logits: torch.Tensor) -> TokenOutput:
        # logits: [vocab]; the sampler's step index is the token's generated index (0 = first token).
        return self._append(seq, seq.sampler.sample(logits, step=len(seq.output_ids)))

    def _append(self, seq: _Sequence, token_id: int) -> TokenOutput:
        seq.output_ids.append(token_id)
        seq.finish_reason = self._finish_reason(seq, token_id)
        return TokenOutput(seq.request_id, token_id, seq.finish_reason)

    def _finish_reason(self, seq: _Sequence, token_id: int) -> str | None:
        params = seq.sampler.params
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in self.config.eos_token_ids:
            return "stop"
        if len(seq.output_ids) >= params.max_tokens:
            return "length"
        return None
