"""One request's state inside the engine: its tokens, its pages, how far its prompt has run."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from shared.engine.sampling import RequestSampler


class SequenceStatus(IntEnum):
    WAITING = 0  # queued: no pages yet
    RUNNING = 1  # holds its pages; prefilling while num_cached < num_prompt_tokens, then decoding
    FINISHED = 2  # done ("stop" / "length"); keeps its pages until freed


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]  # empty when the prompt's KV was adopted (add_prefilled): it never runs here
    num_prompt_tokens: int
    sampler: RequestSampler
    hand_off: bool = False  # stop after the first token and hand the prompt's KV to the caller
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)  # generated tokens, the first included
    num_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None

    @property
    def num_reserved_tokens(self) -> int:
        """Prompt + max_tokens: the cache room taken at admission, so a decode never runs out."""
        return self.num_prompt_tokens + self.sampler.params.max_tokens

    @property
    def running(self) -> bool:
        return self.status is SequenceStatus.RUNNING

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.num_prompt_tokens

    def next_chunk_ids(self, num_new: int) -> list[int]:
        """The input ids of the next `num_new` tokens to run: prompt tokens, or the last generated one."""
        if self.prefilling:
            return self.prompt_ids[self.num_cached : self.num_cached + num_new]
        return self.output_ids[-1:]
