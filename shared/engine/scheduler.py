"""Which sequences run in the next forward pass, and which requests may take cache pages.

Pure and synchronous: no torch, no model. The engine asks `schedule()` for a plan, runs
it, and reports back through the sequences it was given (their `num_cached`,
`output_ids`, `status`); `finish` / `free` end them.

Life cycle:  add() -> WAITING (bounded FIFO, no pages)
             -> admitted at a step when its pages (prompt + max_tokens) are free -> RUNNING
             -> prompt runs in chunks within the step's token budget -> decodes one token a step
             -> FINISHED (keeps its pages for export_kv) -> free() -> gone
A request is refused up front when it could never fit (`KvCapacityError`) or the queue
is full (`QueueFullError`); once queued it waits, it is never evicted. Pages are
reserved whole at admission, so a running sequence never runs out of cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from shared.engine.kv_cache import BlockAllocator, blocks_needed
from shared.engine.sequence import Sequence, SequenceStatus


class KvCapacityError(ValueError):
    """The request (prompt + max_tokens) can never fit this engine's KV cache."""


class KvCacheFullError(RuntimeError):
    """The request would fit, but not while others hold the cache: retry after some finish."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound: retry later (or refuse upstream)."""


@dataclass(frozen=True)
class SchedulingConfig:
    max_num_batched_tokens: int = 2048  # new tokens per forward pass: decodes first, prompt chunks fill the rest
    max_num_seqs: int = 256  # running sequences; queued requests are admitted only below this
    max_waiting: int = 256  # queued requests; add() refuses beyond this

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_new: int  # tokens this sequence runs in the pass

    @property
    def completes_prompt(self) -> bool:
        """Whether the pass ends with the sequence's prompt done (or is a decode): a token is sampled."""
        return self.seq.num_cached + self.num_new >= self.seq.num_prompt_tokens


class Scheduler:
    def __init__(self, config: SchedulingConfig, allocator: BlockAllocator, block_size: int):
        self.config = config
        self.allocator = allocator
        self.block_size = block_size
        self.waiting: deque[Sequence] = deque()
        self.admitted: dict[str, Sequence] = {}  # RUNNING or FINISHED, in admission order

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        # tuple(): one C-level copy, so a concurrent insert cannot break the iteration.
        return sum(seq.running for seq in tuple(self.admitted.values()))

    def can_queue(self) -> bool:
        return len(self.waiting) < self.config.max_waiting

    def fits_budget(self, num_tokens: int) -> bool:
        return blocks_needed(num_tokens, self.block_size) <= self.allocator.num_blocks

    def can_admit(self, num_tokens: int) -> bool:
        return self.allocator.can_allocate(blocks_needed(num_tokens, self.block_size))

    def knows(self, request_id: str) -> bool:
        return request_id in self.admitted or any(seq.request_id == request_id for seq in tuple(self.waiting))

    # -- commands --------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queues a request; it takes pages at a later `schedule()`."""
        self._check_new(seq)
        if not self.can_queue():
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting (max_waiting={self.config.max_waiting})")
        self.waiting.append(seq)

    def admit_now(self, seq: Sequence) -> None:
        """Admits a request at once, ahead of the queue (a synchronous prefill, a KV hand-off)."""
        self._check_new(seq)
        if not self.can_admit(seq.num_reserved_tokens):
            raise KvCacheFullError(
                f"{seq.num_reserved_tokens} tokens need {blocks_needed(seq.num_reserved_tokens, self.block_size)} "
                f"blocks; {self.allocator.num_free} of {self.allocator.num_blocks} are free now"
            )
        self._admit(seq)

    def schedule(self) -> list[ScheduledChunk]:
        """The next pass: every decode, then prompt chunks (running prompts first, then newly admitted) within budget."""
        running = [seq for seq in self.admitted.values() if seq.running]
        plan = [ScheduledChunk(seq, 1) for seq in running if not seq.prefilling]
        budget = self.config.max_num_batched_tokens - len(plan)
        for seq in running:
            if budget <= 0:
                return plan
            if seq.prefilling:
                plan.append(self._prompt_chunk(seq, budget))
                budget -= plan[-1].num_new
        num_running = len(running)
        while budget > 0 and self.waiting and num_running < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.can_admit(seq.num_reserved_tokens):
                break  # first come, first served: later requests do not overtake the head
            self._admit(self.waiting.popleft())
            num_running += 1
            plan.append(self._prompt_chunk(seq, budget))
            budget -= plan[-1].num_new
        return plan

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def free(self, request_id: str) -> bool:
        """Ends the request wherever it is (queued, running, finished) and releases its pages; False if unknown."""
        seq = self.admitted.pop(request_id, None)
        if seq is not None:
            self.allocator.free(seq.block_table)
            seq.block_table = []
            return True
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return True
        return False

    # -- internals -------------------------------------------------------------------------

    def _check_new(self, seq: Sequence) -> None:
        if self.knows(seq.request_id):
            raise ValueError(f"request {seq.request_id!r} is already in this engine")
        reserved = seq.num_reserved_tokens
        if not self.fits_budget(reserved):
            raise KvCapacityError(
                f"prompt ({seq.num_prompt_tokens}) + max_tokens ({seq.sampler.params.max_tokens}) = {reserved} tokens "
                f"can never fit this engine's KV cache of {self.allocator.num_blocks * self.block_size} tokens "
                f"({self.allocator.num_blocks} blocks of {self.block_size})"
            )

    def _admit(self, seq: Sequence) -> None:
        seq.block_table = self.allocator.allocate(blocks_needed(seq.num_reserved_tokens, self.block_size))
        seq.status = SequenceStatus.RUNNING
        self.admitted[seq.request_id] = seq

    @staticmethod
    def _prompt_chunk(seq: Sequence, budget: int) -> ScheduledChunk:
        return ScheduledChunk(seq, min(seq.num_prompt_tokens - seq.num_cached, budget))
