"""Where each request's tokens go: its NATS stream subject, owned by the gateway."""

from __future__ import annotations

from dataclasses import dataclass

from nats.aio.client import Client as NatsClient

from shared import protocol
from shared.protocol import FinishReason, TokenEvent, TokenLogprob, TransferStats


@dataclass
class ActiveStream:
    subject: str
    kv_transfer: TransferStats | None = None


class TokenStreams:
    def __init__(self, nc: NatsClient, worker_id: str):
        self.nc = nc
        self.worker_id = worker_id
        self._active: dict[str, ActiveStream] = {}

    def open(self, request_id: str, subject: str, kv_transfer: TransferStats | None = None) -> None:
        self._active[request_id] = ActiveStream(subject, kv_transfer)

    def close(self, request_id: str) -> ActiveStream | None:
        return self._active.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._active

    def request_ids(self) -> list[str]:
        return list(self._active)

    async def publish(
        self,
        request_id: str,
        token_ids: list[int],
        finish: FinishReason | None = None,
        error: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        stream = self._active.get(request_id)
        if stream is None:
            return  # cancelled meanwhile: nobody listens any more
        event = TokenEvent(
            request_id=request_id,
            worker_id=self.worker_id,
            token_ids=token_ids,
            finish_reason=finish,
            error=error,
            kv_transfer=stream.kv_transfer if finish is not None else None,
            logprobs=logprobs,
        )
        await self.nc.publish(stream.subject, protocol.encode(event))
        if finish is not None:
            self.close(request_id)

    async def publish_to(self, subject: str, request_id: str, finish: FinishReason, error: str) -> None:
        """For failures before a stream was opened on this worker."""
        event = TokenEvent(request_id=request_id, worker_id=self.worker_id, token_ids=[], finish_reason=finish, error=error)
        await self.nc.publish(subject, protocol.encode(event))
