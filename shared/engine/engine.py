"""The synchronous model engine a worker drives: continuous batching over a paged KV cache.

Two ways in, one running batch:
- queued (continuous batching): `add_request(...)` or `add_handoff_request(...)` queue a
  prompt; each `step()` admits what the cache can take, runs prompt chunks and decodes
  together in one forward pass, and returns the tokens of that pass. A hand-off
  request stops after its first token, whose TokenOutput carries the prompt's KV.
- immediate (one request per call): `prefill(...)` / `prefill_and_export(...)` run one
  prompt now; `add_prefilled(...)` adopts a prompt's KV from another engine. The
  sequence then decodes in step() with the rest.

Life cycle of a request (one `Sequence`, see scheduler.py):
  queued -> running (pages for prompt + max_tokens reserved) -> prompt chunks -> first
  token -> one token per step() -> "stop" or "length" -> finished
  free() / abort()    -> pages back to the allocator, from any of those states
A finished sequence keeps its pages (so a prefill worker can still export_kv) until the
caller frees it; free is idempotent, and abort is free under the name a cancel path uses.
A step whose forward pass fails releases the pages of every request in it and raises
`StepError` naming them.

Threading: commands (add_*, prefill, step, export_kv, free, abort) must all run on one
thread; the read-only queries (num_running, num_waiting, num_free_blocks, can_admit, ...)
read snapshots and may be polled from another (an event loop's heartbeat).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

import torch

from shared.engine.kv_cache import BlockAllocator, PagedKVCache, slot_mapping
from shared.engine.loader import LoadedModel
from shared.engine.prepack import prepacked
from shared.engine.runner import StepRunner
from shared.engine.sampling import Choice, RequestSampler, SamplingParams, sample_batch
from shared.engine.scheduler import (
    KvCacheFullError,
    KvCapacityError,
    QueueFullError,
    ScheduledChunk,
    Scheduler,
    SchedulingConfig,
)
from shared.engine.sequence import Sequence
from shared.engine.step_work import Chunk, Export, Keepalive, Step, Work

__all__ = [
    "Engine",
    "KvCacheFullError",
    "KvCapacityError",
    "QueueFullError",
    "SchedulingConfig",
    "StepError",
    "TokenOutput",
]


class StepChannel(Protocol):
    """How the leader's engine reaches the other ranks of its group (shared/ranks/channel.py)."""

    def broadcast(self, work: Work) -> None: ...


class StepError(RuntimeError):
    """A forward pass failed; its requests were released (pages freed) and are gone from the engine."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids


@dataclass(frozen=True)
class TokenOutput:
    request_id: str
    token_id: int
    finish_reason: str | None  # "stop" (EOS or a stop token), "length" (max_tokens), None (more to come)
    logprob: float | None = None  # of token_id, when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # (token, logprob), most likely first
    kv: torch.Tensor | None = field(default=None, compare=False)  # hand-off requests: the prompt's KV (without a kv_holder)
    kv_held: bool = False  # hand-off requests: the prompt's KV went to the engine's kv_holder instead


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        kv_cache_tokens: int = 16384,
        block_size: int = 16,
        kv_dtype: torch.dtype | None = None,
        scheduling: SchedulingConfig | None = None,
        kv_holder: Callable[[str, torch.Tensor], None] | None = None,
    ):
        """`kv_cache_tokens`: the cache budget, rounded down to whole blocks. `kv_dtype`: defaults to the weights'.

        `kv_holder(request_id, kv)`: where a hand-off request's exported KV goes (a worker's
        outbox) instead of its TokenOutput.
        """
        if block_size <= 0 or kv_cache_tokens < block_size:
            raise ValueError(f"need 0 < block_size <= kv_cache_tokens, got {block_size} and {kv_cache_tokens}")
        self.loaded = loaded
        self.config = loaded.config
        # The same weights, with CPU matmuls on pre-packed copies or GGUF blocks where that is faster (prepack.py).
        self.model = prepacked(loaded.model, loaded.block_weights)
        num_blocks = kv_cache_tokens // block_size
        self.kv_cache = PagedKVCache(
            self.config, num_blocks, block_size, kv_dtype or loaded.model.dtype,
            num_layers=loaded.model.num_cache_layers, num_kv_heads=loaded.model.num_cache_heads,
        )
        self.runner = StepRunner(self.model, self.kv_cache, loaded.model.comm)
        # The group's other ranks (shared/ranks/): every step and KV move is broadcast to them first.
        self.channel: StepChannel | None = None
        self._tables_sent: set[str] = set()  # requests whose block table the ranks hold
        self._forget: list[str] = []  # ended since the last step: the ranks drop their tables
        # One scheduler (and page allocator) per attention-DP group: each group's ranks hold
        # their own requests' KV; every step runs all groups together (shared/engine/runner.py).
        self.dp = loaded.model.shard.dp
        config = scheduling or SchedulingConfig()
        self.schedulers = [Scheduler(config, BlockAllocator(num_blocks), block_size) for _ in range(self.dp)]
        self.scheduler, self.allocator = self.schedulers[0], self.schedulers[0].allocator
        self._group_of: dict[str, int] = {}  # request -> its DP group
        self.kv_holder = kv_holder
        self.last_step_prompt_tokens = 0  # prompt tokens the last step() ran: a worker's prefill rate
        self.last_step_started: list[str] = []  # requests whose prompt began in the last step() (just admitted)

    # -- queries ---------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    @property
    def num_blocks(self) -> int:
        """Pages of every DP group's cache together (each group has `kv_cache.num_blocks`)."""
        return self.kv_cache.num_blocks * self.dp

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.kv_cache.dtype

    @property
    def max_tokens(self) -> int:
        """Tokens one DP group's cache holds: the most one request (prompt + max_tokens) may reserve."""
        return self.kv_cache.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return sum(s.allocator.num_free for s in self.schedulers)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's K and V take across all layers (what a hand-off moves per token)."""
        c = self.config
        return c.num_layers * 2 * c.num_kv_heads * c.head_dim * self.kv_dtype.itemsize

    @property
    def num_sequences(self) -> int:
        """Requests holding KV here: running, finished but not yet freed (not the queued ones)."""
        return sum(len(s.admitted) for s in self.schedulers)

    @property
    def num_running(self) -> int:
        """Requests admitted and not finished: prefilling or decoding."""
        return sum(s.num_running for s in self.schedulers)

    @property
    def num_waiting(self) -> int:
        """Requests queued by add_request / add_handoff_request, not admitted yet."""
        return sum(s.num_waiting for s in self.schedulers)

    def dp_loads(self) -> list[int]:
        """Per DP group: its running and queued requests (where the next one should go)."""
        return [s.num_running + s.num_waiting for s in self.schedulers]

    def dp_group_of(self, request_id: str) -> int | None:
        return self._group_of.get(request_id)

    def sequence(self, request_id: str) -> Sequence | None:
        """The request's sequence if it holds pages here (admin: its blocks), else None."""
        group = self._group_of.get(request_id)
        return None if group is None else self.schedulers[group].admitted.get(request_id)

    @property
    def has_unfinished(self) -> bool:
        """Whether step() has work: queued or running requests. A step loop runs while this holds."""
        return self.num_waiting > 0 or self.num_running > 0

    def holds(self, request_id: str) -> bool:
        """Whether the request is here: queued, running, or finished and not yet freed."""
        return any(s.knows(request_id) for s in self.schedulers)

    def fits_budget(self, num_tokens: int) -> bool:
        """Whether a request reserving `num_tokens` (prompt + max_tokens) could ever be admitted."""
        return self.scheduler.fits_budget(num_tokens)

    def can_admit(self, num_tokens: int, dp_group: int | None = None) -> bool:
        """Whether a request reserving `num_tokens` (prompt + max_tokens) can be admitted now (in `dp_group`, or any)."""
        groups = self.schedulers if dp_group is None else [self.schedulers[dp_group]]
        return any(s.can_admit(num_tokens) for s in groups)

    def can_queue(self) -> bool:
        """Whether add_request would find room in the waiting queue now."""
        return any(s.can_queue() for s in self.schedulers)

    # -- commands: continuous batching -----------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, dp_group: int | None = None) -> None:
        """Queues a request to prefill and decode here; its tokens come out of step(), the first included.

        `dp_group`: the attention-DP group that serves it (default: the least loaded).
        Raises KvCapacityError (can never fit), QueueFullError (queue at its bound), ValueError
        (bad ids, duplicate id, beyond the model's context). A queued request waits for pages.
        """
        self._queue(self._new_sequence(request_id, prompt_ids, sampling, hand_off=False), dp_group)

    def add_handoff_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> None:
        """Queues a prefill for another engine to decode (disaggregated serving).

        step() returns its first token with `kv`, the prompt's `[L, 2, P, H, D]` K/V, and
        releases it here at once; `kv` is None when the first token already finishes the request.
        """
        self._queue(self._new_sequence(request_id, prompt_ids, sampling, hand_off=True), None)

    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        """One forward pass over the running batch: a token for each decode and each finished prompt.

        Admits queued requests as pages allow, runs prompt chunks within the token budget,
        and decodes every running sequence once.
        """
        plans = [s.schedule() for s in self.schedulers]  # one per DP group, run in the same pass
        chunks = [chunk for plan in plans for chunk in plan]
        self.last_step_prompt_tokens = sum(c.num_new for c in chunks if c.seq.prefilling)
        self.last_step_started = [c.seq.request_id for c in chunks if c.seq.prefilling and c.seq.num_cached == 0]
        if not chunks:
            return []
        sampled = [chunk.seq for chunk in chunks if chunk.completes_prompt]  # before the pass moves num_cached
        try:
            logits = self._forward(plans)
            return self._append_all(sampled, logits)
        except Exception as exc:
            failed = [chunk.seq.request_id for chunk in chunks]
            for request_id in failed:
                self.free(request_id)
            raise StepError(failed, exc) from exc

    # -- commands: one request at a time ----------------------------------------------------

    @torch.inference_mode()
    def prefill(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> TokenOutput:
        """Runs the prompt now (alone, in budget-sized chunks), keeps its KV, samples the first token.

        The sequence then decodes in step(). Raises KvCacheFullError when its pages are not free now.
        """
        seq = self._new_sequence(request_id, prompt_ids, sampling, hand_off=False)
        group = self._choose_group(seq.num_reserved_tokens)
        self._admit_now(seq, group)
        try:
            budget = self.scheduler.config.max_num_batched_tokens
            while True:
                chunk = ScheduledChunk(seq, min(seq.num_prompt_tokens - seq.num_cached, budget))
                last = chunk.completes_prompt
                logits = self._forward([[chunk] if g == group else [] for g in range(self.dp)])
                if last:
                    return self._append_all([seq], logits)[0]
        except Exception:
            self.free(request_id)
            raise

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
        """This rank's `[its layers, 2, num_prompt_tokens, its KV heads, head_dim]` (K then V), a new tensor.

        Every other rank of the group exports its own part at the same time (into its outbox).
        """
        seq = self._get(request_id)
        table = list(seq.block_table)
        if self.channel is not None:
            self.channel.broadcast(Export(request_id, table, seq.num_prompt_tokens))
        return self.runner.export(table, seq.num_prompt_tokens)

    def keepalive(self) -> None:
        """While idle: lets the other ranks know the group is alive (no collective of theirs times out)."""
        if self.channel is not None:
            forget, self._forget = self._forget, []
            self.channel.broadcast(Keepalive(forget))

    def add_prefilled(
        self,
        request_id: str,
        prompt_ids: Seq[int] | int,
        first_token: int,
        kv: torch.Tensor,
        sampling: SamplingParams,
    ) -> None:
        """Decode side of a hand-off: adopts a prompt's KV and first token; step() produces token 2 onwards.

        `prompt_ids` may be the ids or just their count: the KV already carries the prompt.
        Raises KvCacheFullError when its pages are not free now.
        """
        if self.channel is not None:
            raise RuntimeError("add_prefilled loads a whole KV on one rank; a rank group takes KV through add_prefilled_with")
        num_prompt = prompt_ids if isinstance(prompt_ids, int) else len(prompt_ids)
        expected = (self.kv_cache.key.shape[0], 2, num_prompt, self.kv_cache.key.shape[1], self.config.head_dim)
        if tuple(kv.shape) != expected:
            raise ValueError(f"KV for {request_id!r} has shape {tuple(kv.shape)}, expected {expected}")

        def load(block_table: list[int]) -> None:
            self.kv_cache.load(self._slots(block_table, num_prompt), kv)

        self.add_prefilled_with(request_id, num_prompt, first_token, sampling, load)

    def add_prefilled_with(
        self,
        request_id: str,
        num_prompt_tokens: int,
        first_token: int,
        sampling: SamplingParams,
        write_kv: Callable[[list[int]], None],
        dp_group: int = 0,
    ) -> None:
        """`add_prefilled` for KV that `write_kv(block_table)` writes straight into this engine's pages.

        The request's pages are reserved first; `write_kv` fills the prompt's slots of them
        (e.g. a re-shard scatter into `kv_cache.hnd_views()`). If it raises, the pages go
        back and the error propagates: nothing of the request stays. `dp_group`: the DP group
        whose ranks received the KV (the hand-off's destination group).
        """
        self._check_token_ids([first_token])
        seq = Sequence(request_id, [], num_prompt_tokens, RequestSampler(sampling))
        self._check_context(seq)
        self._admit_now(seq, dp_group)
        try:
            write_kv(list(seq.block_table))
        except BaseException:
            self.free(request_id)
            raise
        seq.num_cached = num_prompt_tokens
        # The first token was sampled on the prefill side as generated index 0; ours continue from 1.
        self._append(seq, Choice(first_token))

    def free(self, request_id: str) -> None:
        """Releases the request (queued, running or finished) and its pages; unknown or freed ids are ignored."""
        group = self._group_of.pop(request_id, None)
        if group is not None:
            self.schedulers[group].free(request_id)
        self.runner.tables.pop(request_id, None)
        if request_id in self._tables_sent:
            self._tables_sent.discard(request_id)
            self._forget.append(request_id)

    def abort(self, request_id: str) -> None:
        """Stops a request wherever it is and releases its pages (same as free)."""
        self.free(request_id)

    # -- internals -------------------------------------------------------------------------

    def _get(self, request_id: str) -> Sequence:
        seq = self.sequence(request_id)
        if seq is None:
            raise KeyError(f"no sequence {request_id!r} holds KV in this engine")
        return seq

    def _choose_group(self, num_tokens: int) -> int:
        """The least loaded DP group, preferring one that can admit the request now."""
        loads = self.dp_loads()
        return min(range(self.dp), key=lambda g: (not self.schedulers[g].can_admit(num_tokens), loads[g], g))

    def _queue(self, seq: Sequence, dp_group: int | None) -> None:
        if self.holds(seq.request_id):
            raise ValueError(f"request {seq.request_id!r} is already in this engine")
        group = self._choose_group(seq.num_reserved_tokens) if dp_group is None else dp_group
        self.schedulers[group].add(seq)
        self._group_of[seq.request_id] = group

    def _admit_now(self, seq: Sequence, group: int) -> None:
        if self.holds(seq.request_id):
            raise ValueError(f"request {seq.request_id!r} is already in this engine")
        self.schedulers[group].admit_now(seq)
        self._group_of[seq.request_id] = group

    def _new_sequence(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, hand_off: bool) -> Sequence:
        self._check_token_ids(prompt_ids)
        seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), RequestSampler(sampling), hand_off=hand_off)
        self._check_context(seq)
        return seq

    def _check_token_ids(self, token_ids: Seq[int]) -> None:
        if not token_ids:
            raise ValueError("prompt must hold at least one token")
        bad = [t for t in token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")

    def _check_context(self, seq: Sequence) -> None:
        if seq.num_prompt_tokens <= 0:
            raise ValueError("prompt must hold at least one token")
        if seq.num_reserved_tokens > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt ({seq.num_prompt_tokens}) + max_tokens ({seq.sampler.params.max_tokens}) = "
                f"{seq.num_reserved_tokens} exceeds the model's context of {self.config.max_position_embeddings} tokens"
            )

    def _slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        # Flat cache slots of positions 0 .. num_tokens - 1: [num_tokens]
        table = torch.tensor(block_table, dtype=torch.int64)
        return slot_mapping(table, torch.arange(num_tokens), self.block_size)

    def _forward(self, plans: list[list[ScheduledChunk]]) -> torch.Tensor:
        """Runs every DP group's plan on every rank; float32 logits `[R, vocab]` for the chunks that sample, group by group."""
        step = self._step_work(plans)
        if self.channel is not None:
            self.channel.broadcast(step)
        logits = self.runner.run(step)
        for plan in plans:
            for item in plan:
                item.seq.num_cached += item.num_new
        return logits

    def _step_work(self, plans: list[list[ScheduledChunk]]) -> Step:
        """The plans as every rank runs them: new block tables only, and the requests to forget."""
        groups, tables = [], {}
        for plan in plans:
            chunks = []
            for item in plan:
                seq = item.seq
                chunks.append(Chunk(seq.request_id, seq.num_cached, item.num_new, item.completes_prompt, seq.next_chunk_ids(item.num_new)))
                if seq.request_id not in self._tables_sent:
                    tables[seq.request_id] = list(seq.block_table)
                    self._tables_sent.add(seq.request_id)
            groups.append(chunks)
        forget, self._forget = self._forget, []
        return Step(groups, tables, forget)

    def _append_all(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenOutput]:
        # logits: [len(seqs), vocab]; a sequence's sampling step is the token's generated index (0 = first).
        choices = sample_batch(logits, [seq.sampler for seq in seqs], [len(seq.output_ids) for seq in seqs])
        return [self._append(seq, choice) for seq, choice in zip(seqs, choices)]

    def _append(self, seq: Sequence, choice: Choice) -> TokenOutput:
        seq.output_ids.append(choice.token_id)
        reason = self._finish_reason(seq, choice.token_id)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        kv, held = None, False
        if seq.hand_off:  # its decode goes on elsewhere (or nowhere): nothing stays here
            kv = self.export_kv(seq.request_id) if reason is None else None
            self.free(seq.request_id)
            if kv is not None and self.kv_holder is not None:
                self.kv_holder(seq.request_id, kv)
                kv, held = None, True
        return TokenOutput(seq.request_id, choice.token_id, reason, choice.logprob, choice.top_logprobs, kv, held)

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.sampler.params
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in self.config.eos_token_ids:
            return "stop"
        if len(seq.output_ids) >= params.max_tokens:
            return "length"
        return None
