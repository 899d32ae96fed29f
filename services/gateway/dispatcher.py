"""The gateway's NATS side: place a request, submit it, and yield its token events.

Each request is a `Flight` (migration.py decides; this file does the I/O). An attempt's
stream subscription is opened before its job is sent so no token can be missed. One
inbox per request takes, in order, its stream's events, worker-down events, NATS
reconnects and operator interrupts, so one task decides everything about a request.
Leaving the iterator early (client gone, error) cancels the request on every worker
that holds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import structlog
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError

from services.gateway.migration import DEFAULT_MIGRATION_LIMIT, Action, Flight, Verdict
from services.gateway.openai_schema import RequestError
from shared import protocol
from shared.protocol import (
    CancelRequest,
    FinishReason,
    JobReply,
    PlaceReply,
    PlaceRequest,
    Placement,
    Sampling,
    ServiceError,
    TokenEvent,
    WorkerDown,
)
from shared.subjects import Subjects

log = structlog.get_logger()

_place_reply = protocol.decoder(PlaceReply)
_job_reply = protocol.decoder(JobReply)
_token_event = protocol.decoder(TokenEvent)
_worker_down = protocol.decoder(WorkerDown)

CONTROL_TIMEOUT_S = 2.0
RECONNECT_POLL_S = 0.2


@dataclass(frozen=True)
class _AttemptEvent:
    number: int
    event: TokenEvent


class _ConnectionLost:
    pass


@dataclass(frozen=True)
class _Interrupt:
    event: TokenEvent  # CANCELLED, from the gateway itself


def _as_request_error(error: ServiceError) -> RequestError:
    return RequestError(int(error.code), error.message)


class Dispatched:
    """A submitted request: where it runs now and its events (migrations happen inside)."""

    def __init__(self, run: "_FlightRun"):
        self._run = run
        self.events: AsyncIterator[TokenEvent] = run.events()

    @property
    def placement(self) -> Placement:
        return self._run.flight.attempt.placement

    @property
    def migrations(self) -> int:
        return self._run.flight.retries


class Dispatcher:
    def __init__(self, nc: NatsClient, subjects: Subjects, stall_timeout_s: float, migration_limit: int = DEFAULT_MIGRATION_LIMIT):
        self.nc = nc
        self.subjects = subjects
        self.stall_timeout_s = stall_timeout_s
        self.migration_limit = migration_limit
        self._runs: dict[str, _FlightRun] = {}
        self._subscription = None
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        """Listens for worker-down events and this connection's reconnects (both end attempts)."""
        self._subscription = await self.nc.subscribe(self.subjects.worker_down, cb=self._on_worker_down)
        self._watcher = asyncio.create_task(self._watch_reconnects(self.nc.stats["reconnects"]), name="nats-reconnects")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._subscription is not None:
            await self._subscription.unsubscribe()

    async def _on_worker_down(self, msg) -> None:
        try:
            down = _worker_down.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("malformed_worker_down")
            return
        for run in list(self._runs.values()):
            run.inbox.put_nowait(down)

    async def _watch_reconnects(self, seen: int) -> None:
        while True:
            await asyncio.sleep(RECONNECT_POLL_S)
            if self.nc.stats["reconnects"] != seen:
                seen = self.nc.stats["reconnects"]
                log.warning("nats_reconnected", in_flight=len(self._runs))
                for run in list(self._runs.values()):
                    run.inbox.put_nowait(_ConnectionLost())

    async def request(self, subject: str, payload: bytes, what: str):
        try:
            return await self.nc.request(subject, payload, timeout=CONTROL_TIMEOUT_S)
        except NoRespondersError:
            raise RequestError(503, f"no {what} is running") from None
        except NatsTimeoutError:
            raise RequestError(503, f"the {what} did not answer within {CONTROL_TIMEOUT_S:.0f}s") from None

    async def place(self, request: PlaceRequest) -> Placement:
        reply = _place_reply.decode((await self.request(self.subjects.place, protocol.encode(request), "scheduler")).data)
        if isinstance(reply, ServiceError):
            raise _as_request_error(reply)
        return reply

    async def dispatch(self, request_id: str, model: str, prompt_ids: list[int], sampling: Sampling) -> Dispatched:
        flight = Flight(request_id, model, list(prompt_ids), sampling, self.migration_limit)
        run = _FlightRun(self, flight)
        await run.launch()
        self._runs[request_id] = run
        return Dispatched(run)

    def forget(self, request_id: str) -> None:
        self._runs.pop(request_id, None)

    def interrupt(self, request_id: str, why: str = "cancelled by an operator") -> bool:
        """Ends a request's event stream with CANCELLED (its workers are then told to stop)."""
        run = self._runs.get(request_id)
        if run is None:
            return False
        run.interrupt(why)
        return True

    def interrupt_all(self, why: str) -> int:
        """Ends every request in flight (a drain's leftovers); returns how many."""
        runs = list(self._runs.values())
        for run in runs:
            run.interrupt(why)
        return len(runs)

    async def cancel(self, request_id: str, worker_ids: set[str]) -> None:
        payload = protocol.encode(CancelRequest(request_id))
        for worker_id in worker_ids:
            await self.nc.publish(self.subjects.worker_cancel(worker_id), payload)
        log.info("request_cancelled", request_id=request_id)


class _FlightRun:
    """The I/O shell around one Flight: its subscription, its inbox, its attempts."""

    def __init__(self, dispatcher: Dispatcher, flight: Flight):
        self.dispatcher = dispatcher
        self.flight = flight
        self.inbox: asyncio.Queue = asyncio.Queue()
        self._subscription = None

    async def launch(self) -> None:
        """Places and submits the next attempt; a job refused as unavailable is tried elsewhere."""
        flight, dispatcher = self.flight, self.dispatcher
        while True:
            placement = await dispatcher.place(flight.place_request())
            attempt = flight.placed(placement)
            stream_subject = dispatcher.subjects.stream(attempt.request_id)

            async def on_event(msg, number=attempt.number) -> None:
                try:
                    self.inbox.put_nowait(_AttemptEvent(number, _token_event.decode(msg.data)))
                except msgspec.DecodeError:
                    log.warning("malformed_token_event", subject=msg.subject)

            self._subscription = await dispatcher.nc.subscribe(stream_subject, cb=on_event)
            job = flight.job(placement, stream_subject)
            try:
                raw = await dispatcher.request(dispatcher.subjects.worker_prefill(placement.prefill_worker), protocol.encode(job), "prefill worker")
                reply = _job_reply.decode(raw.data)
                if isinstance(reply, ServiceError):
                    raise _as_request_error(reply)
            except RequestError as error:
                await self._unsubscribe()
                if error.status != 503 or not flight.can_retry:
                    raise
                log.warning("prefill_job_refused", worker=placement.prefill_worker, error=error.message)
                flight.refused_by(placement.prefill_worker)
                continue
            except BaseException:
                await self._unsubscribe()
                raise
            return

    def interrupt(self, why: str) -> None:
        attempt = self.flight.attempt
        event = TokenEvent(attempt.request_id, "gateway", [], FinishReason.CANCELLED, why)
        self.inbox.put_nowait(_Interrupt(event))

    async def events(self) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.inbox.get(), timeout=self.dispatcher.stall_timeout_s)
                except TimeoutError:
                    stall = self.dispatcher.stall_timeout_s
                    raise RequestError(503, f"no token for {stall:.0f}s; the worker may have failed") from None
                if isinstance(item, _Interrupt):
                    yield item.event
                    return
                verdict = self._judge(item)
                if verdict.action is Action.DROP:
                    if isinstance(item, _AttemptEvent) and item.number == self.flight.attempt.number:
                        log.warning("stream_event_dropped", worker=item.event.worker_id, reason=verdict.reason)
                    continue
                if verdict.action is Action.FAIL:
                    raise RequestError(verdict.status, verdict.reason)
                if verdict.action is Action.MIGRATE:
                    await self._migrate(verdict.reason)
                    continue
                # Marked before the yield: the consumer may close us at it, and a finished request needs no cancel.
                finished = verdict.event.finish_reason is not None
                yield verdict.event
                if finished:
                    return
        finally:
            self.dispatcher.forget(self.flight.request_id)
            await self._unsubscribe()
            if not finished:
                attempt = self.flight.attempt
                await self.dispatcher.cancel(attempt.request_id, attempt.senders())

    def _judge(self, item: _AttemptEvent | WorkerDown | _ConnectionLost) -> Verdict:
        if isinstance(item, _AttemptEvent):
            return self.flight.on_event(item.number, item.event)
        if isinstance(item, WorkerDown):
            return self.flight.on_worker_down(item)
        return self.flight.on_connection_lost()

    async def _migrate(self, why: str) -> None:
        old = self.flight.attempt
        log.warning("request_migrating", attempt=old.request_id, reason=why, forwarded=len(self.flight.generated))
        await self._unsubscribe()
        await self.dispatcher.cancel(old.request_id, old.senders())
        try:
            await self.launch()
        except RequestError as error:  # nowhere to go: say why it had to move, and why it could not
            raise RequestError(error.status, f"{why}; no other worker could take it over: {error.message}") from None
        new = self.flight.attempt.placement
        log.info("request_migrated", attempt=new.request_id, prefill=new.prefill_worker, decode=new.decode_worker)

    async def _unsubscribe(self) -> None:
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            try:
                await subscription.unsubscribe()
            except Exception as exc:  # a closed connection: the subscription is gone anyway
                log.debug("unsubscribe_failed", error=repr(exc))
