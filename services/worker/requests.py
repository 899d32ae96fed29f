r"""The worker's request table: one object per request, and the one place every request ends.

Life cycle on one worker (a request passes through the phases of its path only):

  prefill job:  QUEUED -> PREFILLING -> first token -> HANDING_OFF (KV pushed to a decoder) -> ended
                                                   \-> DECODING (colocated: decodes here)  -> ended
  decode job:   AWAITING_KV (offer accepted, receives posted) -> DECODING -> ended

Each request owns what it holds: engine pages (PREFILLING, DECODING), a KV session (its
ranks' exported or received KV while HANDING_OFF / AWAITING_KV), and its token stream.
Every end — finished, cancelled, failed, lease expired, drained — goes through
`RequestTable.release`, which gives back all of it once and tells the client how it ended
when nobody else did. Heartbeat and admin counts are read from the table, never kept by hand.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import structlog

from shared.protocol import ErrorCode, FinishReason, Path, Sampling, TransferStats

log = structlog.get_logger()


class Phase(enum.IntEnum):
    QUEUED = 1  # accepted, waiting for engine pages
    PREFILLING = 2  # admitted: its prompt runs in chunks
    HANDING_OFF = 3  # first token out; its KV is on the way to a decoder
    AWAITING_KV = 4  # a decoder that accepted the hand-off, bytes not all here yet
    DECODING = 5  # one token per engine step
    FINISHED = 6  # released: no longer in the table

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Ending:
    """How a request ended here; `reason` None means it ended elsewhere or its last event is out already."""

    reason: FinishReason | None
    error: str | None = None
    code: ErrorCode | None = None

    @classmethod
    def failed(cls, error: str, code: ErrorCode = ErrorCode.INTERNAL) -> Ending:
        return cls(FinishReason.ERROR, error, code)


DONE = Ending(None)  # finished normally (its last token carried the finish reason) or handed off
CANCELLED = Ending(None)  # the gateway cancelled it: nobody listens any more


@dataclass(eq=False)
class WorkerRequest:
    request_id: str
    phase: Phase
    path: Path
    stream_subject: str
    num_prompt_tokens: int
    sampling: Sampling
    decode_worker: str = ""  # prefill jobs of the disaggregated path: where its KV goes
    created_at: float = field(default_factory=time.monotonic)
    num_generated: int = 0
    kv_transfer: TransferStats | None = None  # a decoded hand-off's stats, reported with the last token

    @property
    def age_s(self) -> float:
        return time.monotonic() - self.created_at


# What `release` needs from the worker: give back engine pages, drop a KV session, send a final event.
Cleanup = Callable[[WorkerRequest, Ending], Awaitable[None]]


class RequestTable:
    def __init__(self, cleanup: Cleanup):
        self._requests: dict[str, WorkerRequest] = {}
        self._cleanup = cleanup
        self.ended: dict[str, int] = {}  # ending label -> count, for status and drain reports

    def add(self, request: WorkerRequest) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id!r} is already on this worker")
        self._requests[request.request_id] = request

    def get(self, request_id: str) -> WorkerRequest | None:
        return self._requests.get(request_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __iter__(self) -> Iterator[WorkerRequest]:
        return iter(list(self._requests.values()))

    def __len__(self) -> int:
        return len(self._requests)

    def move(self, request_id: str, phase: Phase) -> WorkerRequest | None:
        request = self._requests.get(request_id)
        if request is not None:
            request.phase = phase
        return request

    async def release(self, request_id: str, ending: Ending) -> bool:
        """Ends a request here: out of the table first (so nothing races it), then its resources. False if not here."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        request.phase = Phase.FINISHED
        label = ending.reason.label if ending.reason is not None else "done"
        self.ended[label] = self.ended.get(label, 0) + 1
        try:
            await self._cleanup(request, ending)
        except Exception:  # a cleanup failure must not leave the request half-ended for the caller
            log.exception("release_failed", request_id=request_id)
        return True

    # -- counts (heartbeats, admin, admission) ----------------------------------------------

    def count(self, *phases: Phase) -> int:
        return sum(1 for r in self._requests.values() if r.phase in phases)

    @property
    def waiting(self) -> int:
        """Accepted, no token produced here yet: queued or prefilling prompts, hand-offs arriving."""
        return self.count(Phase.QUEUED, Phase.PREFILLING, Phase.AWAITING_KV)

    @property
    def running(self) -> int:
        """Holding engine pages and stepping: prompts being prefilled, streams decoding."""
        return self.count(Phase.PREFILLING, Phase.DECODING)

    @property
    def queued_prefill_tokens(self) -> int:
        return sum(r.num_prompt_tokens for r in self._requests.values() if r.phase in (Phase.QUEUED, Phase.PREFILLING))
