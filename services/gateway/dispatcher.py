"""The gateway's NATS side: place a request, submit it, and yield its token events.

The stream subscription is opened before the job is sent so no token can be missed;
leaving the iterator early (client gone, error) cancels the request on every worker
that holds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError

from services.gateway.openai_schema import RequestError
from shared import protocol
from shared.protocol import (
    CancelRequest,
    FinishReason,
    JobReply,
    PlaceReply,
    PlaceRequest,
    Placement,
    PrefillJob,
    Sampling,
    ServiceError,
    TokenEvent,
)
from shared.subjects import Subjects

log = structlog.get_logger()

_place_reply = protocol.decoder(PlaceReply)
_job_reply = protocol.decoder(JobReply)
_token_event = protocol.decoder(TokenEvent)

CONTROL_TIMEOUT_S = 2.0


@dataclass
class Dispatched:
    placement: Placement
    events: AsyncIterator[TokenEvent]


def _as_request_error(error: ServiceError) -> RequestError:
    return RequestError(int(error.code), error.message)


class Dispatcher:
    def __init__(self, nc: NatsClient, subjects: Subjects, stall_timeout_s: float):
        self.nc = nc
        self.subjects = subjects
        self.stall_timeout_s = stall_timeout_s
        self._inboxes: dict[str, asyncio.Queue[TokenEvent]] = {}

    async def _request(self, subject: str, payload: bytes, what: str):
        try:
            return await self.nc.request(subject, payload, timeout=CONTROL_TIMEOUT_S)
        except NoRespondersError:
            raise RequestError(503, f"no {what} is running") from None
        except NatsTimeoutError:
            raise RequestError(503, f"the {what} did not answer within {CONTROL_TIMEOUT_S:.0f}s") from None

    async def place(self, request: PlaceRequest) -> Placement:
        reply = _place_reply.decode((await self._request(self.subjects.place, protocol.encode(request), "scheduler")).data)
        if isinstance(reply, ServiceError):
            raise _as_request_error(reply)
        return reply

    async def dispatch(self, request_id: str, model: str, prompt_ids: list[int], sampling: Sampling) -> Dispatched:
        placement = await self.place(PlaceRequest(request_id, model, len(prompt_ids), sampling.max_tokens))
        stream_subject = self.subjects.stream(request_id)
        inbox: asyncio.Queue[TokenEvent] = asyncio.Queue()

        async def on_event(msg) -> None:
            inbox.put_nowait(_token_event.decode(msg.data))

        subscription = await self.nc.subscribe(stream_subject, cb=on_event)
        job = PrefillJob(
            request_id, prompt_ids, sampling, placement.path, placement.decode_worker, stream_subject,
            placement.decode_layout, placement.decode_dp_group,
        )
        try:
            raw = await self._request(self.subjects.worker_prefill(placement.prefill_worker), protocol.encode(job), "prefill worker")
            reply = _job_reply.decode(raw.data)
            if isinstance(reply, ServiceError):
                raise _as_request_error(reply)
        except BaseException:
            await subscription.unsubscribe()
            raise
        return Dispatched(placement, self._events(request_id, placement, inbox, subscription))

    def interrupt(self, request_id: str) -> bool:
        """Ends a request's event stream with CANCELLED (its workers are then told to stop)."""
        inbox = self._inboxes.get(request_id)
        if inbox is None:
            return False
        inbox.put_nowait(TokenEvent(request_id, "gateway", [], FinishReason.CANCELLED, "cancelled by an operator"))
        return True

    async def _events(self, request_id, placement, inbox, subscription) -> AsyncIterator[TokenEvent]:
        finished = False
        self._inboxes[request_id] = inbox
        try:
            while True:
                try:
                    event = await asyncio.wait_for(inbox.get(), timeout=self.stall_timeout_s)
                except TimeoutError:
                    raise RequestError(503, f"no token for {self.stall_timeout_s:.0f}s; the worker may have failed") from None
                yield event
                if event.finish_reason is not None:
                    finished = event.finish_reason is not FinishReason.CANCELLED
                    return
        finally:
            del self._inboxes[request_id]
            await subscription.unsubscribe()
            if not finished:
                await self.cancel(request_id, placement)

    async def cancel(self, request_id: str, placement: Placement) -> None:
        payload = protocol.encode(CancelRequest(request_id))
        for worker_id in {placement.prefill_worker, placement.decode_worker}:
            await self.nc.publish(self.subjects.worker_cancel(worker_id), payload)
        log.info("request_cancelled", request_id=request_id)


