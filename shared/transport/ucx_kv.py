"""KV bytes peer to peer over UCX (ucxx), one tagged message per segment.

The decoder runs a listener so prefill workers can open endpoints to it; receives are
posted on the UCX worker with the segment's tag (announced over NATS beforehand), so
a message is matched to its session no matter which endpoint carried it and no extra
header message is needed.

`KvSender.send` takes the buffers as an async iterable too and sends each one as soon as
it is ready, so the prefill side gathers the next pair while this one is on the wire.
Large receive buffers (and the prefill side's pooled staging) are huge-page backed host
memory (`host_memory`); a pair already contiguous in the KV is sent from it in place.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence

import numpy as np
import torch

from shared.protocol import KvSegment, TransferStats
from shared.transport.host_memory import host_buffer
from shared.transport.ucx_env import configure_ucx_environment

configure_ucx_environment()
import ucxx  # noqa: E402  (must follow the environment set-up)
from ucxx.exceptions import UCXError  # noqa: E402


def segment_tag(session_id: str, src_rank: int, dst_rank: int) -> int:
    digest = hashlib.blake2b(f"{session_id}/{src_rank}/{dst_rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A zero-copy uint8 view of a contiguous CPU tensor (works for bfloat16 too)."""
    if not tensor.is_contiguous():
        raise ValueError("UCX buffers must be contiguous")
    return tensor.reshape(-1).view(torch.uint8).numpy()


class KvReceiver:
    """Decoder side: a listener for prefill endpoints, and tagged receives."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self._listener = None
        self._endpoints: list = []

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("KvReceiver.start() first")
        return self._listener.port

    async def start(self) -> None:
        async def keep_endpoint(endpoint) -> None:
            self._endpoints.append(endpoint)

        self._listener = ucxx.create_listener(keep_endpoint, port=0)

    async def receive(self, segments: Sequence[KvSegment], timeout: float) -> tuple[list[torch.Tensor], TransferStats]:
        """Posts one receive per segment; returns the raw byte buffers in segment order.

        TimeoutError after `timeout`; the caller may also be cancelled. Either way the posted
        receives are left to finish, not cancelled (see `_settle`).
        """
        buffers = [host_buffer(seg.nbytes) for seg in segments]
        started = time.perf_counter()
        receives = [asyncio.ensure_future(ucxx.recv(buf.numpy(), tag=seg.tag)) for buf, seg in zip(buffers, segments)]
        _settle(receives)
        if receives:
            done, pending = await asyncio.wait(receives, timeout=timeout)  # wait() cancels nothing, even when cancelled
            if pending:
                raise TimeoutError(f"{len(pending)} of {len(receives)} KV messages did not arrive within {timeout:.1f} s")
            for receive in done:
                receive.result()  # a transport failure
        stats = TransferStats(
            nbytes=sum(seg.nbytes for seg in segments),
            seconds=time.perf_counter() - started,
            num_messages=len(segments),
        )
        return buffers, stats

    async def close(self) -> None:
        for endpoint in self._endpoints:
            if not endpoint.closed:
                await endpoint.close()
        self._endpoints.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class KvSender:
    """Prefill side: cached endpoints per decoder (the first connection is slow)."""

    def __init__(self) -> None:
        self._endpoints: dict[tuple[str, int], object] = {}
        self._connecting: dict[tuple[str, int], asyncio.Lock] = {}

    async def connect(self, host: str, port: int) -> None:
        """Opens (and keeps) the endpoint ahead of the first hand-off, which would pay for it."""
        await self._endpoint(host, port)

    async def _endpoint(self, host: str, port: int):
        key = (host, port)
        lock = self._connecting.setdefault(key, asyncio.Lock())
        async with lock:
            endpoint = self._endpoints.get(key)
            if endpoint is None or endpoint.closed:
                try:
                    endpoint = await ucxx.create_endpoint(host, port)
                except (UCXError, OSError, TimeoutError) as exc:
                    raise ConnectionError(f"cannot reach the decoder's UCX listener at {host}:{port}: {exc!r}") from exc
                self._endpoints[key] = endpoint
            return endpoint

    async def send(
        self, host: str, port: int, segments: Sequence[KvSegment], buffers: Sequence[torch.Tensor] | AsyncIterable[torch.Tensor]
    ) -> TransferStats:
        """Sends buffer `i` as segment `i`; an async iterable's buffers go out as it yields them."""
        endpoint = await self._endpoint(host, port)
        started = time.perf_counter()
        sends: list[asyncio.Future] = []
        try:
            index = 0
            async for buffer in _aiter(buffers):
                if index >= len(segments):
                    raise ValueError(f"more buffers than the {len(segments)} segments")
                segment = segments[index]
                sends.append(asyncio.ensure_future(endpoint.send(as_bytes(buffer), tag=segment.tag, force_tag=True)))
                index += 1
            if index != len(segments):
                raise ValueError(f"{index} buffers for {len(segments)} segments")
            if sends:
                await asyncio.wait(sends)  # not gather: a cancelled push leaves its sends to finish (`_settle`)
            for send in sends:
                send.result()
        except UCXError as exc:
            raise ConnectionError(f"KV send to the UCX listener at {host}:{port} failed: {exc!r}") from exc
        finally:
            _settle(sends)
        return TransferStats(
            nbytes=sum(seg.nbytes for seg in segments),
            seconds=time.perf_counter() - started,
            num_messages=len(segments),
        )

    async def close(self) -> None:
        for endpoint in self._endpoints.values():
            if not endpoint.closed:
                await endpoint.close()
        self._endpoints.clear()


# A tagged receive nobody sends to stays posted; after this long no sender can still be
# sending it (hand-offs hold their KV for a lease of seconds), so cancelling it is safe.
ABANDONED_RECEIVE_S = 300.0


def _settle(operations: list[asyncio.Future]) -> None:
    """Lets UCX operations finish on their own instead of cancelling them.

    Cancelling a receive or send that UCX is still serving frees its buffer while UCX may
    write into (or read from) it: memory corruption, seen here as an aborted process after
    many cancelled hand-offs. A pending operation keeps its buffer alive (its coroutine holds
    it), so an abandoned one simply finishes later, or a receive that nobody sends to is
    cancelled once `ABANDONED_RECEIVE_S` has passed. Its late outcome is consumed quietly.
    """
    loop = asyncio.get_running_loop()
    for operation in operations:
        if operation.done():
            _consume(operation)
            continue
        deadline = loop.call_later(ABANDONED_RECEIVE_S, operation.cancel)
        operation.add_done_callback(lambda done, timer=deadline: (timer.cancel(), _consume(done)))


def _consume(operation: asyncio.Future) -> None:
    if not operation.cancelled():
        operation.exception()


async def _aiter(buffers: Sequence[torch.Tensor] | AsyncIterable[torch.Tensor]) -> AsyncIterator[torch.Tensor]:
    if isinstance(buffers, AsyncIterable):
        async for buffer in buffers:
            yield buffer
    else:
        for buffer in buffers:
            yield buffer
