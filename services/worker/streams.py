"""Publishing a request's token events on its stream subject (owned by the gateway)."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient

from services.worker.requests import Ending, WorkerRequest
from shared import protocol
from shared.protocol import FinishReason, TokenEvent, TokenLogprob


class TokenStreams:
    def __init__(self, nc: NatsClient, worker_id: str):
        self.nc = nc
        self.worker_id = worker_id

    async def publish(
        self,
        request: WorkerRequest,
        token_ids: list[int],
        finish: FinishReason | None = None,
        logprobs: list[TokenLogprob] | None = None,
        decode_worker: str = "",
    ) -> None:
        event = TokenEvent(
            request_id=request.request_id,
            worker_id=self.worker_id,
            token_ids=token_ids,
            finish_reason=finish,
            kv_transfer=request.kv_transfer if finish is not None else None,
            logprobs=logprobs,
            decode_worker=decode_worker,
        )
        request.num_generated += len(token_ids)
        await self.nc.publish(request.stream_subject, protocol.encode(event))

    async def publish_end(self, subject: str, request_id: str, ending: Ending) -> None:
        """The last event of a request that ended without a final token (failure, expiry, drain)."""
        event = TokenEvent(
            request_id=request_id, worker_id=self.worker_id, token_ids=[], finish_reason=ending.reason,
            error=ending.error, error_code=ending.code,
        )
        await self.nc.publish(subject, protocol.encode(event))
