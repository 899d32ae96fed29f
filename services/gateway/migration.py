"""A request's route through workers, and what to do when one of them fails. Pure: no I/O.

Life cycle of one request at the gateway (a `Flight`), attempt by attempt:
  placed -> PREFILLING (waits on its prefill worker, and on the decoder the KV will go to)
  -> HANDING_OFF (disaggregated: the first token came from the prefill worker, the KV is
  on its way) -> DECODING (tokens from the decode worker; only it matters now) -> finished.
A worker it waits on that dies (worker-down event), an error that says "unavailable", or
the gateway's own NATS outage (tokens may have been lost) -> MIGRATE: a new attempt whose
prompt is the original prompt plus every token forwarded so far, `max_tokens` what remains
and `step_offset` the tokens so far (seeded sampling continues identically), placed away
from the workers that failed it; at most `migration_limit` times, then 503.

Each attempt has its own id (`<id>`, `<id>-m1`, ...) and so its own stream subject: late
events of an old attempt never mix into the new one, and a worker may briefly hold both
without an id clash. A stream accepts events only from the attempt's placed workers
(stream integrity); anything else is dropped, and the caller logs it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgspec

from shared.protocol import (
    ErrorCode,
    FinishReason,
    PlaceRequest,
    Placement,
    PrefillJob,
    Sampling,
    TokenEvent,
    WorkerDown,
)

DEFAULT_MIGRATION_LIMIT = 3

def http_status(code: ErrorCode | None) -> int:
    """A worker error's HTTP status (error codes are HTTP statuses: unavailability is 503, never 500); no code means a bug (500)."""
    return int(code) if code is not None else 500


class Phase(enum.IntEnum):
    PREFILLING = 1
    HANDING_OFF = 2
    DECODING = 3


class Action(enum.Enum):
    FORWARD = "forward"  # pass the (possibly trimmed) event to the client
    DROP = "drop"  # not for this request's current attempt
    MIGRATE = "migrate"  # end the attempt, start the next one
    FAIL = "fail"  # end the request with an HTTP error


@dataclass(frozen=True)
class Verdict:
    action: Action
    event: TokenEvent | None = None  # FORWARD
    status: int = 0  # FAIL
    reason: str = ""  # why (DROP, MIGRATE, FAIL)


@dataclass
class Attempt:
    number: int
    request_id: str  # this attempt's id on the wire
    placement: Placement
    phase: Phase = Phase.PREFILLING
    decoder: str = ""  # where decoding happens, if not the placement's decoder (a redirect)

    @property
    def prefill_worker(self) -> str:
        return self.placement.prefill_worker

    @property
    def decode_worker(self) -> str:
        return self.decoder or self.placement.decode_worker

    def senders(self) -> set[str]:
        """Workers whose events this attempt's stream accepts."""
        return {self.prefill_worker, self.placement.decode_worker, self.decode_worker}

    def waits_on(self) -> set[str]:
        """Workers whose death stops this attempt now."""
        if self.phase is Phase.DECODING:
            return {self.decode_worker}
        return {self.prefill_worker, self.decode_worker}

    def incarnation_of(self, worker_id: str) -> str:
        """The placed incarnation of `worker_id` ("" for a redirect target: not known)."""
        if worker_id == self.placement.decode_worker:
            return self.placement.decode_incarnation
        if worker_id == self.placement.prefill_worker:
            return self.placement.prefill_incarnation
        return ""

    def is_placed_on(self, worker_id: str, incarnation: str) -> bool:
        """Whether this attempt waits on `worker_id` in that incarnation ("" matches any)."""
        if worker_id not in self.waits_on():
            return False
        placed = self.incarnation_of(worker_id)
        return not placed or not incarnation or placed == incarnation

    def blocking_worker(self) -> str:
        """The worker this attempt is waiting on right now (the one to avoid if it says 'unavailable')."""
        return self.prefill_worker if self.phase is Phase.PREFILLING else self.decode_worker


@dataclass
class Flight:
    """One client request across its attempts: what was forwarded, where it runs, what failed it."""

    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: Sampling
    migration_limit: int = DEFAULT_MIGRATION_LIMIT
    generated: list[int] = field(default_factory=list)  # every token forwarded to the client
    attempt: Attempt | None = None
    avoid: set[str] = field(default_factory=set)  # workers that failed this request

    # -- the next attempt ------------------------------------------------------------------

    @property
    def _next_number(self) -> int:
        return 0 if self.attempt is None else self.attempt.number + 1

    @property
    def next_request_id(self) -> str:
        number = self._next_number
        return self.request_id if number == 0 else f"{self.request_id}-m{number}"

    @property
    def retries(self) -> int:
        """Attempts after the first one: migrations and re-submissions of refused jobs."""
        return 0 if self.attempt is None else self.attempt.number

    @property
    def can_retry(self) -> bool:
        return self.retries < self.migration_limit

    def place_request(self) -> PlaceRequest:
        remaining = self.sampling.max_tokens - len(self.generated)
        return PlaceRequest(self.next_request_id, self.model, len(self.prompt_ids) + len(self.generated), remaining, exclude=sorted(self.avoid))

    def job(self, placement: Placement, stream_subject: str) -> PrefillJob:
        """The next attempt's job: the prompt so far continues from the next token."""
        sampling = msgspec.structs.replace(
            self.sampling, max_tokens=self.sampling.max_tokens - len(self.generated), step_offset=len(self.generated)
        )
        return PrefillJob(
            placement.request_id, self.prompt_ids + self.generated, sampling, placement.path, placement.decode_worker,
            stream_subject, placement.decode_layout, placement.decode_dp_group,
        )  # fmt: skip

    def placed(self, placement: Placement) -> Attempt:
        """Records the next attempt as running on `placement`."""
        self.attempt = Attempt(self._next_number, placement.request_id, placement)
        return self.attempt

    def refused_by(self, worker_id: str) -> None:
        """The attempt's job was refused before it started (draining, vanished): try elsewhere."""
        self.avoid.add(worker_id)

    # -- what happens to the current attempt ------------------------------------------------

    def on_event(self, number: int, event: TokenEvent) -> Verdict:
        attempt = self.attempt
        if attempt is None or number != attempt.number or event.request_id != attempt.request_id:
            return Verdict(Action.DROP, reason="an earlier attempt's event")
        if event.worker_id not in attempt.senders():
            return Verdict(Action.DROP, reason=f"from {event.worker_id!r}, not a worker placed for this request")
        self._advance(attempt, event)
        if event.finish_reason is FinishReason.ERROR:
            return self._on_error(attempt, event)
        if event.finish_reason is FinishReason.CANCELLED:
            return Verdict(Action.FAIL, status=503, reason=event.error or "request cancelled")
        return Verdict(Action.FORWARD, event=self._counted(event))

    def on_worker_down(self, down: WorkerDown) -> Verdict:
        attempt = self.attempt
        if attempt is None or not attempt.is_placed_on(down.worker_id, down.incarnation):
            return Verdict(Action.DROP, reason="not placed on that worker (or a duplicate event)")
        self.avoid.add(down.worker_id)
        return self._migrate_or_fail(f"worker {down.worker_id} failed: {down.reason}")

    def on_connection_lost(self) -> Verdict:
        """The gateway's NATS connection dropped: events may have been lost, so continue elsewhere."""
        if self.attempt is None:
            return Verdict(Action.DROP, reason="not started")
        return self._migrate_or_fail("the gateway lost its NATS connection")

    def _advance(self, attempt: Attempt, event: TokenEvent) -> None:
        if event.decode_worker and event.worker_id == attempt.prefill_worker:
            attempt.decoder = event.decode_worker  # the prefill worker handed the KV to another decoder
        if not event.token_ids:
            return
        if event.worker_id == attempt.decode_worker:
            attempt.phase = Phase.DECODING
        elif attempt.phase is Phase.HANDING_OFF:
            attempt.decoder = event.worker_id  # more tokens from the prefill worker: it decodes the request itself
            attempt.phase = Phase.DECODING
        else:
            attempt.phase = Phase.HANDING_OFF

    def _counted(self, event: TokenEvent) -> TokenEvent:
        """The event's tokens, at most up to max_tokens in all (count-based dedupe)."""
        room = self.sampling.max_tokens - len(self.generated)
        if len(event.token_ids) > room:
            logprobs = event.logprobs[:room] if event.logprobs is not None else None
            event = msgspec.structs.replace(event, token_ids=event.token_ids[:room], logprobs=logprobs)
        self.generated.extend(event.token_ids)
        return event

    def _on_error(self, attempt: Attempt, event: TokenEvent) -> Verdict:
        message = event.error or "generation failed"
        if event.error_code is ErrorCode.UNAVAILABLE:
            self.avoid.add(attempt.blocking_worker())
            return self._migrate_or_fail(message)
        return Verdict(Action.FAIL, status=http_status(event.error_code), reason=message)

    def _migrate_or_fail(self, why: str) -> Verdict:
        if self.can_retry:
            return Verdict(Action.MIGRATE, reason=why)
        if self.migration_limit == 0:
            return Verdict(Action.FAIL, status=503, reason=f"{why} (migration is off)")
        return Verdict(Action.FAIL, status=503, reason=f"{why}; migration limit of {self.migration_limit} reached")

