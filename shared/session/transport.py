"""How one rank moves bulk bytes: tagged messages to and from peers (UCX in serving)."""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence
from typing import Protocol

import torch

from shared.protocol import KvSegment, TransferStats
from shared.transport.ucx_kv import KvReceiver, KvSender


class KvTransport(Protocol):
    """Bulk bytes between ranks: one message per segment, matched by its tag."""

    def address(self) -> tuple[str, int]:
        """Where peers send to this rank."""
        ...

    async def send(self, peer: tuple[str, int], segments: Sequence[KvSegment], buffers: AsyncIterable[torch.Tensor]) -> TransferStats:
        """Sends buffer `i` as segment `i`, each as soon as `buffers` yields it."""
        ...

    async def receive(self, segments: Sequence[KvSegment], timeout: float) -> tuple[list[torch.Tensor], TransferStats]: ...


class UcxKvTransport:
    """`KvTransport` over `shared.transport.ucx_kv`: a listener for incoming KV, cached endpoints for outgoing."""

    def __init__(self, sender: KvSender, receiver: KvReceiver):
        self.sender = sender
        self.receiver = receiver

    def address(self) -> tuple[str, int]:
        return self.receiver.host, self.receiver.port

    async def send(self, peer: tuple[str, int], segments: Sequence[KvSegment], buffers: AsyncIterable[torch.Tensor]) -> TransferStats:
        return await self.sender.send(peer[0], peer[1], segments, buffers)

    async def receive(self, segments: Sequence[KvSegment], timeout: float) -> tuple[list[torch.Tensor], TransferStats]:
        return await self.receiver.receive(segments, timeout)

    async def close(self) -> None:
        await self.sender.close()
        await self.receiver.close()
