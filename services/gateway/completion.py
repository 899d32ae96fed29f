"""Turning token events into OpenAI responses: text deltas, chunks and usage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from services.gateway.logprobs import LogprobFormatter, ScoredToken
from services.gateway.stop_strings import StopStrings
from shared.engine.tokenizer import ChatTokenizer, IncrementalDetokenizer
from shared.protocol import FinishReason, Placement, TokenEvent, TransferStats

OPENAI_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


class Route(Protocol):
    """Where a request runs now (the dispatcher's view; it changes on migration)."""

    @property
    def placement(self) -> Placement: ...

    @property
    def migrations(self) -> int: ...


@dataclass
class Completion:
    """One request's progress: generated tokens, text so far, and how it ended."""

    request_id: str
    model: str
    chat: bool
    placement: Placement
    num_prompt_tokens: int
    tokenizer: ChatTokenizer
    hidden_token_ids: frozenset[int]
    return_token_ids: bool = False
    stop_strings: StopStrings = field(default_factory=StopStrings)
    created: int = field(default_factory=lambda: int(time.time()))
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    error: str | None = None
    kv_transfer: TransferStats | None = None
    stopped_by_string: bool = False  # the gateway ended it: workers must be told to stop
    logprobs: LogprobFormatter | None = None  # set when the request asked for logprobs
    scored: list[ScoredToken] = field(default_factory=list)  # visible tokens with their logprobs
    migrations: int = 0  # times the request moved to other workers (a worker failed under it)

    def __post_init__(self) -> None:
        self._detokenizer = IncrementalDetokenizer(self.tokenizer)
        self._decoded = ""  # everything detokenized; `text` is the part shown so far
        self._unsent_scored = 0  # scored tokens not yet in a chunk
        self._sent_text_len = 0  # their text's length so far: the next chunk's first text_offset

    def follow(self, route: "Route") -> None:
        """Takes the request's current workers (they change when it migrates)."""
        self.placement = route.placement
        self.migrations = route.migrations

    def absorb(self, event: TokenEvent) -> str:
        """Adds an event; returns the new visible text."""
        self.token_ids.extend(event.token_ids)
        for index, token_id in enumerate(event.token_ids):
            if event.finish_reason is FinishReason.STOP and token_id in self.hidden_token_ids:
                continue  # the EOS / stop token ends the text, it is not part of it
            self._decoded += self._detokenizer.add(token_id)
            if event.logprobs is not None and index < len(event.logprobs):
                self.scored.append(ScoredToken(token_id, event.logprobs[index]))
        end, stopped = self.stop_strings.scan(self._decoded, len(self.text), final=event.finish_reason is not None)
        delta = self._decoded[len(self.text) : end]
        self.text += delta
        if stopped:
            self.finish_reason = FinishReason.STOP
            self.stopped_by_string = True
        elif event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.error = event.error
            self.kv_transfer = event.kv_transfer
        return delta

    @property
    def num_generated(self) -> int:
        return len(self.token_ids)

    def _with_ids(self, choice: dict, token_ids: list[int]) -> dict:
        return choice | {"token_ids": token_ids} if self.return_token_ids else choice

    @property
    def openai_finish_reason(self) -> str | None:
        return None if self.finish_reason is None else OPENAI_FINISH.get(self.finish_reason, "stop")

    def usage(self) -> dict:
        extension = {
            "path": self.placement.path.label,
            "prefill_worker": self.placement.prefill_worker,
            "decode_worker": self.placement.decode_worker,
        }
        if self.migrations:
            extension["migrations"] = self.migrations
        if self.kv_transfer is not None:
            extension |= {
                "kv_transfer_bytes": self.kv_transfer.nbytes,
                "kv_transfer_seconds": self.kv_transfer.seconds,
                "kv_transfer_messages": self.kv_transfer.num_messages,
            }
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_generated,
            "total_tokens": self.num_prompt_tokens + self.num_generated,
            "pdserve": extension,
        }

    def _envelope(self, object_name: str) -> dict:
        return {"id": self.request_id, "object": object_name, "created": self.created, "model": self.model}

    def _logprobs(self, start: int, text_offset: int = 0) -> dict | None:
        # The OpenAI block for scored tokens from `start` on (None when the request did not ask).
        if self.logprobs is None:
            return None
        tokens = self.scored[start:]
        return self.logprobs.chat(tokens) if self.chat else self.logprobs.completion(tokens, text_offset)

    def chunk(self, delta: str, token_ids: list[int], first: bool = False, finish: bool = False) -> dict:
        reason = self.openai_finish_reason if finish else None
        logprobs = None
        if self._unsent_scored < len(self.scored):
            logprobs = self._logprobs(self._unsent_scored, self._sent_text_len)
            if not self.chat:
                self._sent_text_len = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            self._unsent_scored = len(self.scored)
        if self.chat:
            message = {"content": delta}
            if first:
                message = {"role": "assistant", "content": delta}
            choice = {"index": 0, "delta": message, "logprobs": logprobs, "finish_reason": reason}
            return self._envelope("chat.completion.chunk") | {"choices": [self._with_ids(choice, token_ids)]}
        choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": reason}
        return self._envelope("text_completion") | {"choices": [self._with_ids(choice, token_ids)]}

    def usage_chunk(self) -> dict:
        name = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(name) | {"choices": [], "usage": self.usage()}

    def final(self) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": self.text}
            choice = {"index": 0, "message": message, "logprobs": self._logprobs(0), "finish_reason": self.openai_finish_reason}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": self._logprobs(0), "finish_reason": self.openai_finish_reason}
        name = "chat.completion" if self.chat else "text_completion"
        return self._envelope(name) | {"choices": [self._with_ids(choice, self.token_ids)], "usage": self.usage()}
