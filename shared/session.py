"""The seed's session API: KV pushed by a prefill worker, pulled re-sharded by a decoder.

```python
# prefill side
session = engine.create_session(session_id=req_id, layout=PrefillLayout(tp=4, ep=4))
stats = await session.push(kv, target_layout=DecoderLayout(dp=4, ep=16))
# decoder side
pulled = await engine.pull(req_id)              # all pair buffers arrived and checked
pulled.write_into(cache.key, cache.value, block_table)   # re-shard into the paged cache
```

Life cycle of one session (`KvSessionEngine` is a facade the serving engine owns):

1. `push` checks the target layout against its own model (`IncompatibleKvError`, field
   "target_layout"), plans the transfer (cached per layout pair) and, in parallel with
   gathering the first pair buffer, *offers* the session to the decoder through the
   announcer (a `SessionOffer`: spec, layouts, DP group, segments; the services carry it
   over NATS).
2. The decoder's `accept` validates the offer against its own spec and layout and either
   refuses (`SessionRefused(field, message)`, nothing posted) or posts one receive per
   segment into staging buffers and answers `SessionAccepted` with its spec and address.
3. `push` raises on a refusal and re-checks the decoder's spec itself; only then does it
   send: one transport message per (src rank, dst rank) pair with data. Sending is
   pipelined: pair `i` is on the wire while pair `i+1` is gathered (in a thread, into
   pooled staging memory; a pair that is one contiguous slab of the KV is sent in place).
4. `pull` waits until every staging buffer arrived with its expected size and returns a
   `PulledKv`. Nothing touches the decoder's cache before that, so a refused, timed out
   or partial transfer writes nothing; `PulledKv.write_into` does the scatter.

The decoder does not re-shard buffers as they land: on the 2-core dev box the UCX
transfer keeps a core busy in each process (measured CPU time = wall time), so work
overlapped with it slows it by as much, and staging then committing costs more CPU in
all than one scatter at the end (29 + 12 ms vs 23 ms for 188 MB; push+pull 0.75 of raw
with staging vs 0.81 without, same run conditions).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import msgspec
import torch

from kernels.reshard_reference import (
    BlockTable,
    check_cache,
    gather_pair_buffers,
    pair_buffers_to_shards,
    pair_slab,
    piece_view,
    scatter_pair_buffers,
    slice_pair_buffer,
    typed_buffer,
)
from shared.kv_spec import (
    IncompatibleKvError,
    KvSpec,
    check_compatible,
    dtype_from_name,
    dtype_name,
    first_mismatch,
)
from shared.layouts import DecoderLayout, Layout, LayoutError, PrefillLayout, validate
from shared.protocol import (
    KvSegment,
    OfferReply,
    SessionAccepted,
    SessionOffer,
    SessionRefused,
    TransferStats,
    WireKvSpec,
    WireLayout,
)
from shared.transfer_plan import TransferPlan, plan_transfer
from shared.transport.staging_pool import StagingPool
from shared.transport.ucx_kv import KvReceiver, KvSender, segment_tag

__all__ = [
    "IncompatibleKvError",
    "KvSession",
    "KvSessionEngine",
    "KvTransferError",
    "KvTransport",
    "LoopbackAnnouncer",
    "PagedKv",
    "PulledKv",
    "SessionAccepted",
    "SessionAnnouncer",
    "SessionOffer",
    "SessionRefused",
    "UcxKvTransport",
]


class KvTransferError(RuntimeError):
    """Accepted session whose bytes did not all arrive intact (timeout, wrong size)."""


# ---------------------------------------------------------------- wire messages (NATS)


def spec_to_wire(spec: KvSpec) -> WireKvSpec:
    return WireKvSpec(
        spec.model_fingerprint, spec.num_layers, spec.num_q_heads, spec.num_kv_heads, spec.head_dim,
        dtype_name(spec.dtype), spec.page_size, spec.memory_layout, spec.num_experts,
    )


def spec_from_wire(wire: WireKvSpec) -> KvSpec:
    return KvSpec(
        wire.model_fingerprint, wire.num_layers, wire.num_q_heads, wire.num_kv_heads, wire.head_dim,
        dtype_from_name(wire.dtype), wire.page_size, wire.memory_layout, wire.num_experts,
    )


def layout_to_wire(layout: Layout) -> WireLayout:
    return WireLayout(layout.kind, layout.dp, layout.tp, layout.pp, layout.ep)


def layout_from_wire(wire: WireLayout) -> Layout:
    if wire.kind == "prefill":
        if wire.dp != 1:
            raise LayoutError(f"a prefill layout has dp=1, got dp={wire.dp}")
        return PrefillLayout(tp=wire.tp, pp=wire.pp, ep=wire.ep)
    if wire.kind == "decode":
        return DecoderLayout(dp=wire.dp, ep=wire.ep, tp=wire.tp, pp=wire.pp)
    raise LayoutError(f"unknown layout kind {wire.kind!r}")


def wire_segments(plan: TransferPlan, session_id: str, num_tokens: int) -> list[KvSegment]:
    """One transport message per pair buffer, tagged per session and rank pair."""
    return [
        KvSegment(p.src_rank, p.dst_rank, segment_tag(session_id, p.src_rank, p.dst_rank), plan.pair_nbytes(p, num_tokens))
        for p in plan.pairs
    ]


# ---------------------------------------------------------------- ports


class KvTransport(Protocol):
    """Bulk bytes between workers: one message per segment, matched by its tag."""

    def address(self) -> tuple[str, int]:
        """Where peers send to this worker (decoder side)."""
        ...

    async def send(self, peer: tuple[str, int], segments: Sequence[KvSegment], buffers: AsyncIterable[torch.Tensor]) -> TransferStats:
        """Sends buffer `i` as segment `i`, each as soon as `buffers` yields it."""
        ...

    async def receive(self, segments: Sequence[KvSegment], timeout: float) -> tuple[list[torch.Tensor], TransferStats]: ...


class SessionAnnouncer(Protocol):
    """Carries a `SessionOffer` to the decoder and its reply back (NATS request/reply in services)."""

    async def offer(self, offer: SessionOffer, decoder: str | None) -> OfferReply: ...


class UcxKvTransport:
    """`KvTransport` over `shared.transport.ucx_kv` (sender on prefill, receiver on decoder)."""

    def __init__(self, sender: KvSender | None = None, receiver: KvReceiver | None = None):
        self.sender = sender
        self.receiver = receiver

    def address(self) -> tuple[str, int]:
        if self.receiver is None:
            raise RuntimeError("this transport has no receiver: it cannot be a decoder")
        return self.receiver.host, self.receiver.port

    async def send(self, peer: tuple[str, int], segments: Sequence[KvSegment], buffers: AsyncIterable[torch.Tensor]) -> TransferStats:
        if self.sender is None:
            raise RuntimeError("this transport has no sender: it cannot be a prefill worker")
        return await self.sender.send(peer[0], peer[1], segments, buffers)

    async def receive(self, segments: Sequence[KvSegment], timeout: float) -> tuple[list[torch.Tensor], TransferStats]:
        if self.receiver is None:
            raise RuntimeError("this transport has no receiver: it cannot be a decoder")
        return await self.receiver.receive(segments, timeout)


class LoopbackAnnouncer:
    """In-process announcer for tests and single-process runs; messages still go through msgpack."""

    _offer_codec = msgspec.msgpack.Decoder(SessionOffer)
    _reply_codec = msgspec.msgpack.Decoder(OfferReply)

    def __init__(self) -> None:
        self._decoders: dict[str, KvSessionEngine] = {}
        self.offers: list[SessionOffer] = []

    def register(self, name: str, engine: KvSessionEngine) -> None:
        self._decoders[name] = engine

    async def offer(self, offer: SessionOffer, decoder: str | None) -> OfferReply:
        if decoder is None:
            if len(self._decoders) != 1:
                return SessionRefused("decoder", f"name a decoder: {len(self._decoders)} are registered")
            decoder = next(iter(self._decoders))
        engine = self._decoders.get(decoder)
        if engine is None:
            return SessionRefused("decoder", f"unknown decoder {decoder!r}; known: {', '.join(self._decoders)}")
        received = self._offer_codec.decode(msgspec.msgpack.encode(offer))
        self.offers.append(received)
        reply = await engine.accept(received)
        return self._reply_codec.decode(msgspec.msgpack.encode(reply))


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class PagedKv:
    """A request's KV still in the prefill engine's paged cache (pushed without an export copy).

    The engine must keep these pages unchanged until `push` returns (the gather runs in a thread).
    """

    key: torch.Tensor  # [L, blocks, page, H, D] (NHD) or [L, blocks, H, page, D] (HND)
    value: torch.Tensor
    block_table: BlockTable
    num_tokens: int


@dataclass
class PulledKv:
    """Every pair buffer of a session, arrived and size-checked; not yet in any cache."""

    session_id: str
    plan: TransferPlan
    num_tokens: int
    buffers: list[torch.Tensor]  # staged pair buffers (raw bytes), in plan.pairs order
    stats: TransferStats

    def write_into(
        self, key: torch.Tensor, value: torch.Tensor, block_table: BlockTable,
        *, kernel: Literal["torch", "triton"] = "torch",
    ) -> None:
        """Re-shard into the decoder's paged cache (pages from `block_table`)."""
        if kernel == "triton":
            from kernels.reshard_triton import scatter_pair_buffers_triton

            staged = [buffer.to(key.device, non_blocking=True) for buffer in self.buffers]  # received on the host
            scatter_pair_buffers_triton(staged, self.plan, key, value, block_table, self.num_tokens)
        else:
            scatter_pair_buffers(self.buffers, self.plan, key, value, block_table, self.num_tokens)

    def shards(self) -> dict[int, torch.Tensor]:
        """Per destination rank: `[its layers, 2, T, its heads, D]` in the decoder's dtype."""
        return pair_buffers_to_shards(self.buffers, self.plan, self.num_tokens)

    def dense(self) -> torch.Tensor:
        """All of it as `[L, 2, T, H, D]` in the decoder's dtype (serving uses `write_into` instead)."""
        spec = self.plan.dst_spec
        shape = (spec.num_layers, 2, self.num_tokens, spec.num_kv_heads, spec.head_dim)
        device = self.buffers[0].device if self.buffers else torch.device("cpu")
        out = torch.empty(shape, dtype=spec.dtype, device=device)
        for buffer, pair in zip(self.buffers, self.plan.pairs):
            flat = typed_buffer(buffer, pair, self.plan, self.num_tokens)
            for piece in pair.pieces:
                seg = piece.segment
                out[seg.layer_start : seg.layer_stop, :, :, seg.head_start : seg.head_stop] = piece_view(flat, piece, self.num_tokens)
        return out


# ---------------------------------------------------------------- engine facade


@dataclass
class _Incoming:
    done: asyncio.Future  # -> PulledKv, or IncompatibleKvError / KvTransferError
    task: asyncio.Task | None = None
    accepted: bool = False
    waiting: int = 0  # pulls waiting on `done`


class KvSession:
    """Prefill side of one request; push once."""

    def __init__(self, engine: KvSessionEngine, session_id: str, layout: Layout):
        self.engine = engine
        self.session_id = session_id
        self.layout = layout
        self.plan: TransferPlan | None = None
        self._pushed = False

    async def push(
        self, kv: torch.Tensor | PagedKv, target_layout: Layout, *, decoder: str | None = None, dst_dp_group: int = 0
    ) -> TransferStats:
        """Send `kv` (`[L, 2, T, H, D]` or a `PagedKv`) to a decoder of `target_layout`, DP group `dst_dp_group`."""
        if self._pushed:
            raise RuntimeError(f"session {self.session_id!r} was already pushed")
        spec = self.engine.spec
        num_tokens = _num_tokens(kv, spec)
        try:
            validate(target_layout, spec)
            # Wire format depends on the source only: plan against our own spec until the decoder answers.
            wire_plan = plan_transfer(self.layout, target_layout, spec, spec, dst_dp_group)
        except LayoutError as error:
            raise IncompatibleKvError("target_layout", f"KV hand-off refused: {error}") from None
        self._pushed = True
        segments = wire_segments(wire_plan, self.session_id, num_tokens)
        offer = SessionOffer(
            self.session_id, spec_to_wire(spec), layout_to_wire(self.layout), layout_to_wire(target_layout),
            dst_dp_group, num_tokens, segments,
        )
        buffers = _PairBuffers(kv, wire_plan, self.engine.staging)
        buffers.prefetch()  # the first gather overlaps the offer's round trip
        sent = False
        try:
            reply = await self.engine.announcer.offer(offer, decoder)
            if isinstance(reply, SessionRefused):
                raise IncompatibleKvError(reply.field, reply.message)
            dst_spec = spec_from_wire(reply.spec)
            check_compatible(spec, dst_spec, allow_dtype_cast=self.engine.allow_dtype_cast)
            self.plan = plan_transfer(self.layout, target_layout, spec, dst_spec, dst_dp_group)
            stats = await self.engine.transport.send((reply.host, reply.port), segments, buffers.stream())
            sent = True
            return stats
        finally:
            # A failed send may still be reading its buffers: those are dropped, not reused.
            await buffers.close(recycle=sent or buffers.handed_out == 0)


def _num_tokens(kv: torch.Tensor | PagedKv, spec: KvSpec) -> int:
    if isinstance(kv, PagedKv):
        check_cache(kv.key, kv.value, spec, "prefill cache")
        return kv.num_tokens
    expected = (spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[4]) != expected or kv.dtype != spec.dtype:
        raise ValueError(f"KV {tuple(kv.shape)} {kv.dtype} is not [L, 2, T, H, D] = {expected} {spec.dtype}")
    return kv.shape[2]


class _PairBuffers:
    """The pair buffers of one push, gathered one at a time in a worker thread so that
    gathering pair `i+1` overlaps sending pair `i`. Copies go into pooled staging memory
    (already faulted in); a pair that is one contiguous slab of exported KV is sent in place."""

    def __init__(self, kv: torch.Tensor | PagedKv, plan: TransferPlan, pool: StagingPool):
        self.kv, self.plan, self.pool = kv, plan, pool
        self.handed_out = 0
        self._staging: list[torch.Tensor] = []  # taken from the pool
        self._next: asyncio.Future[torch.Tensor] | None = None
        self._next_index = 0

    def prefetch(self) -> None:
        """Starts gathering the next pair unless one is under way or none is left."""
        if self._next is None and self._next_index < len(self.plan.pairs):
            self._next = asyncio.ensure_future(asyncio.to_thread(self._gather, self._next_index))
            self._next_index += 1

    async def stream(self) -> AsyncIterator[torch.Tensor]:
        """Each pair's buffer in plan order, the next one already gathering when one is yielded."""
        while True:
            self.prefetch()
            if self._next is None:
                return
            buffer = await self._next
            self._next = None
            self.prefetch()
            self.handed_out += 1
            yield buffer

    async def close(self, recycle: bool) -> None:
        if self._next is not None:  # its thread cannot be stopped: let it finish first
            with contextlib.suppress(Exception):
                await self._next
            self._next = None
        for buffer in self._staging:
            if recycle:
                self.pool.give_back(buffer)
            else:
                self.pool.forget(buffer)
        self._staging.clear()

    def _gather(self, index: int) -> torch.Tensor:
        kv, plan = self.kv, self.plan
        if not isinstance(kv, PagedKv):
            slab = pair_slab(kv, plan, index)
            if slab is not None:
                return slab
        staging = self.pool.take(plan.pair_nbytes(plan.pairs[index], self.num_tokens))
        self._staging.append(staging)
        if isinstance(kv, PagedKv):
            return gather_pair_buffers(kv.key, kv.value, kv.block_table, kv.num_tokens, plan, out=[staging], pairs=[index])[0]
        return slice_pair_buffer(kv, plan, index, out=staging)

    @property
    def num_tokens(self) -> int:
        return self.kv.num_tokens if isinstance(self.kv, PagedKv) else self.kv.shape[2]


@dataclass
class KvSessionEngine:
    """Owns a worker's side of KV hand-offs: outgoing sessions (prefill) and incoming ones (decode).

    `layout` is this worker's layout: the default for outgoing sessions and the layout
    incoming sessions must target. Dtype changes are cast unless `allow_dtype_cast=False`.
    """

    spec: KvSpec
    layout: Layout
    transport: KvTransport
    announcer: SessionAnnouncer
    receive_timeout: float = 60.0
    allow_dtype_cast: bool = True
    staging: StagingPool = field(default_factory=StagingPool, repr=False)  # outgoing pair buffers
    _incoming: dict[str, _Incoming] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        validate(self.layout, self.spec)

    def create_session(self, session_id: str, layout: Layout | None = None) -> KvSession:
        """A prefill-side session; `layout` (validated now) is how this worker holds the request's KV."""
        layout = self.layout if layout is None else layout
        validate(layout, self.spec)
        return KvSession(self, session_id, layout)

    async def accept(self, offer: SessionOffer) -> OfferReply:
        """Decoder side: validate an offer; on success post the receives into staging buffers."""
        incoming = self._slot(offer.session_id)
        if incoming.accepted:
            return SessionRefused("session_id", f"session {offer.session_id!r} was already offered")
        try:
            plan = self._plan_for(offer)
        except IncompatibleKvError as error:
            if incoming.waiting:
                incoming.done.set_exception(error)  # a pull already waits: tell it
            else:
                del self._incoming[offer.session_id]
            return SessionRefused(error.field, str(error))
        incoming.accepted = True
        incoming.task = asyncio.create_task(self._receive(offer, plan, incoming))
        host, port = self.transport.address()
        return SessionAccepted(spec_to_wire(self.spec), host, port)

    async def pull(self, session_id: str, timeout: float | None = None) -> PulledKv:
        """Decoder side: the session's KV once every pair buffer arrived (offer may come later).

        Raises `IncompatibleKvError` for a refused session and `KvTransferError` when the
        bytes do not all arrive intact within `timeout` (default `receive_timeout`); the
        session is then dropped. Either way nothing was written anywhere.
        """
        incoming = self._slot(session_id)
        limit = self.receive_timeout if timeout is None else timeout
        incoming.waiting += 1
        try:
            return await asyncio.wait_for(asyncio.shield(incoming.done), limit)
        except TimeoutError:
            pass  # handled below, once this pull no longer counts as waiting
        finally:
            incoming.waiting -= 1
            if incoming.done.done() and self._incoming.get(session_id) is incoming:
                del self._incoming[session_id]
        what = "KV did not arrive" if incoming.accepted else "no offer arrived"
        self.cancel(session_id)
        raise KvTransferError(f"session {session_id!r}: {what} within {limit:.1f} s")

    def cancel(self, session_id: str) -> None:
        """Drop a session (cancelled request): its receives stop and its staging buffers are freed."""
        incoming = self._incoming.pop(session_id, None)
        if incoming is None:
            return
        if incoming.task is not None:
            incoming.task.cancel()
        if not incoming.done.done():
            if incoming.waiting:
                incoming.done.set_exception(KvTransferError(f"session {session_id!r} was cancelled"))
            else:
                incoming.done.cancel()

    def _slot(self, session_id: str) -> _Incoming:
        incoming = self._incoming.get(session_id)
        if incoming is None:
            incoming = self._incoming[session_id] = _Incoming(asyncio.get_running_loop().create_future())
        return incoming

    def _plan_for(self, offer: SessionOffer) -> TransferPlan:
        try:
            src_spec = spec_from_wire(offer.spec)
        except ValueError as error:
            raise IncompatibleKvError("spec", f"KV hand-off refused: bad source spec: {error}") from None
        mismatch = first_mismatch(src_spec, self.spec, allow_dtype_cast=self.allow_dtype_cast)
        if mismatch is not None:
            raise IncompatibleKvError(*mismatch)
        try:
            src_layout, dst_layout = layout_from_wire(offer.src_layout), layout_from_wire(offer.dst_layout)
            if dst_layout != self.layout:
                raise LayoutError(f"session targets {dst_layout!r} but this decoder runs {self.layout!r}")
            plan = plan_transfer(src_layout, dst_layout, src_spec, self.spec, offer.dst_dp_group)
        except LayoutError as error:
            raise IncompatibleKvError("target_layout", f"KV hand-off refused: {error}") from None
        if offer.segments != wire_segments(plan, offer.session_id, offer.num_tokens):
            raise IncompatibleKvError("segments", "KV hand-off refused: offered segments differ from this decoder's plan")
        return plan

    async def _receive(self, offer: SessionOffer, plan: TransferPlan, incoming: _Incoming) -> None:
        try:
            buffers, stats = await self.transport.receive(offer.segments, self.receive_timeout)
            sizes = [b.numel() * b.element_size() for b in buffers]
            expected = [s.nbytes for s in offer.segments]
            if sizes != expected:
                raise KvTransferError(f"session {offer.session_id!r}: received {sizes} bytes per segment, expected {expected}")
            result: PulledKv | BaseException = PulledKv(offer.session_id, plan, offer.num_tokens, list(buffers), stats)
        except TimeoutError:
            result = KvTransferError(f"session {offer.session_id!r}: KV did not arrive within {self.receive_timeout:.1f} s")
        except Exception as error:  # transport failure: the session fails, the worker keeps serving
            result = error if isinstance(error, KvTransferError) else KvTransferError(f"session {offer.session_id!r}: {error!r}")
        if incoming.done.done():
            return
        if isinstance(result, BaseException):
            incoming.done.set_exception(result)
        else:
            incoming.done.set_result(result)
