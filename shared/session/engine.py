"""The seed's session API on the leader of a worker instance.

```python
# prefill side: each rank exported its shard of the request's KV (engine step), then
session = sessions.create_session(session_id=req_id, layout=PrefillLayout(tp=4, ep=4))
stats = await session.push(ExportedKv(num_tokens), target_layout=DecoderLayout(dp=4, ep=16), decoder="decode-1")
# decoder side
pulled = await sessions.pull(req_id)      # every rank holds its pair buffers, checked
pulled.write_into(block_table)            # each rank re-shards into its own pages
```

Life cycle of one session:
1. `push` checks the target layout against the model (`IncompatibleKvError`, field
   "target_layout"), plans the transfer (cached per layout pair), lets the ranks start
   gathering, and *offers* the session to the decoder through the announcer (a
   `SessionOffer`: spec, layouts, DP group, segments; the services carry it over NATS).
2. The decoder's `accept` validates the offer against its own spec and layout and either
   refuses (`SessionRefused(field, message)`, nothing posted) or has every rank post its
   receives and answers `SessionAccepted` with its spec and every rank's address.
3. `push` raises on a refusal and re-checks the decoder's spec itself; only then does each
   rank send its own pairs, straight to the decoder ranks that need them: one message per
   (src rank, dst rank) pair with data, no byte through a rank that does not hold it.
4. `pull` waits until every rank's buffers arrived with their expected sizes. Nothing
   touches a cache before that, so a refused, timed out or partial transfer writes nothing;
   `PulledKv.write_into` does the scatter, on every rank.

Leases: a session holds memory on both sides (KV kept by the prefill ranks, receive
buffers posted by the decoder ranks) for at most `lease_s`. On the prefill side the lease
starts with the session's first `create_session`: a push that fails keeps the KV, so the
caller may offer it to another decoder (a new session under the same id) until the lease
is over; a push past it fails, and the caller drops the KV (`cancel`). A successful push
drops it at once. A decoder whose bytes have not all arrived within the lease releases
everything it reserved.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from shared.kv_spec import IncompatibleKvError, KvSpec, check_compatible, first_mismatch
from shared.layouts import Layout, LayoutError, validate
from shared.protocol import OfferReply, SessionAccepted, SessionOffer, SessionRefused, TransferStats
from shared.session.announcer import SessionAnnouncer
from shared.session.errors import KvTransferError
from shared.session.group import InProcessGroup, RankGroup
from shared.session.pair_buffers import PagedKv
from shared.session.wire import layout_from_wire, layout_to_wire, spec_from_wire, spec_to_wire, wire_segments
from shared.transfer_plan import TransferPlan, plan_transfer

DEFAULT_LEASE_S = 10.0


@dataclass(frozen=True)
class ExportedKv:
    """A session's KV as the ranks hold it: each rank exported its own shard (engine step)."""

    num_tokens: int


@dataclass
class PulledKv:
    """A session whose pair buffers have all arrived on every rank of this decoder; not yet in any cache."""

    session_id: str
    plan: TransferPlan
    num_tokens: int
    stats: TransferStats
    group: RankGroup = field(repr=False)

    def write_into(self, block_table: list[int]) -> None:
        """Every rank re-shards its buffers into the same pages of its own cache (engine thread)."""
        self.group.scatter(self.session_id, block_table)


@dataclass
class _Incoming:
    done: asyncio.Future  # -> PulledKv, or IncompatibleKvError / KvTransferError
    task: asyncio.Task | None = None
    accepted: bool = False
    waiting: int = 0  # pulls waiting on `done`


class KvSession:
    """Prefill side of one request; push once."""

    def __init__(self, engine: KvSessionEngine, session_id: str, layout: Layout, announcer: SessionAnnouncer):
        self.engine = engine
        self.session_id = session_id
        self.layout = layout
        self.announcer = announcer
        self.plan: TransferPlan | None = None
        self._pushed = False

    async def push(
        self,
        kv: ExportedKv | torch.Tensor | PagedKv,
        *,
        target_layout: Layout,
        decoder: str | None = None,
        dst_dp_group: int = 0,
    ) -> TransferStats:
        """Sends the session's KV to a decoder of `target_layout`, into its DP group `dst_dp_group`.

        `kv`: `ExportedKv` when the ranks already hold their shards (an engine step exported
        them); a one-rank group may pass its KV (`[L, 2, T, H, D]` or a `PagedKv`) here instead.
        Raises IncompatibleKvError on a refusal, KvTransferError when the bytes did not all
        leave (peer gone, lease over). After a failure the ranks still hold the KV, for a
        retry on another decoder within the lease: `cancel` drops it.
        """
        if self._pushed:
            raise RuntimeError(f"session {self.session_id!r} was already pushed")
        self._pushed = True
        engine, group = self.engine, self.engine.group
        if isinstance(kv, ExportedKv):
            num_tokens = kv.num_tokens
        elif isinstance(group, InProcessGroup) and group.world == 1:
            num_tokens = kv.num_tokens if isinstance(kv, PagedKv) else kv.shape[2]
            group.ranks[0].hold(self.session_id, kv)
        else:
            raise ValueError("only a one-rank group takes the KV in push; the ranks of a larger one hold their own shards")
        try:
            async with asyncio.timeout_at(engine.lease_deadline(self.session_id)):
                stats = await self._offer_and_send(num_tokens, target_layout, decoder, dst_dp_group)
        except TimeoutError:
            raise KvTransferError(f"session {self.session_id!r}: hand-off not done within its {engine.lease_s:.1f} s lease") from None
        engine.cancel(self.session_id)  # sent: no rank keeps this KV
        return stats

    async def _offer_and_send(self, num_tokens: int, target_layout: Layout, decoder: str | None, dst_dp_group: int) -> TransferStats:
        engine, spec = self.engine, self.engine.spec
        try:
            validate(target_layout, spec)
            # The wire format depends on the source only: plan against our own spec until the decoder answers.
            wire_plan = plan_transfer(self.layout, target_layout, spec, spec, dst_dp_group)
        except LayoutError as error:
            raise IncompatibleKvError("target_layout", f"KV hand-off refused: {error}") from None
        segments = wire_segments(wire_plan, self.session_id, num_tokens)
        offer = SessionOffer(
            self.session_id, spec_to_wire(spec), layout_to_wire(self.layout), layout_to_wire(target_layout),
            dst_dp_group, num_tokens, segments,
        )
        engine.group.prepare(self.session_id, wire_plan)  # the first gathers overlap the offer's round trip
        reply = await self.announcer.offer(offer, decoder)
        if isinstance(reply, SessionRefused):
            raise IncompatibleKvError(reply.field, reply.message)
        dst_spec = spec_from_wire(reply.spec)
        check_compatible(spec, dst_spec, allow_dtype_cast=engine.allow_dtype_cast)
        self.plan = plan_transfer(self.layout, target_layout, spec, dst_spec, dst_dp_group)
        peers = {address.rank: (address.host, address.port) for address in reply.addresses}
        return await engine.group.send(self.session_id, self.plan, peers)


class KvSessionEngine:
    """A worker instance's side of KV hand-offs: outgoing sessions (prefill) and incoming ones (decode).

    `layout` is this worker's layout: the default for outgoing sessions and the layout
    incoming sessions must target. Dtype changes are cast unless `allow_dtype_cast=False`.
    """

    def __init__(
        self,
        spec: KvSpec,
        layout: Layout,
        group: RankGroup,
        announcer: SessionAnnouncer | None = None,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        allow_dtype_cast: bool = True,
    ):
        validate(layout, spec)
        if group.world != layout.world:
            raise ValueError(f"{layout!r} has {layout.world} ranks; the group has {group.world}")
        self.spec, self.layout, self.group, self.announcer = spec, layout, group, announcer
        self.lease_s = lease_s
        self.allow_dtype_cast = allow_dtype_cast
        self._incoming: dict[str, _Incoming] = {}
        self._leases: dict[str, float] = {}  # outgoing session -> event-loop time its KV must be gone by

    def create_session(self, session_id: str, layout: Layout | None = None, announcer: SessionAnnouncer | None = None) -> KvSession:
        """A prefill-side session; `layout` (validated now) is how this worker holds the request's KV.

        `announcer` carries this session's offer (default: the engine's), e.g. one that wraps
        it in the request's DecodeJob.
        """
        layout = self.layout if layout is None else layout
        validate(layout, self.spec)
        announcer = announcer or self.announcer
        if announcer is None:
            raise ValueError("a session needs an announcer to carry its offer")
        self._leases.setdefault(session_id, asyncio.get_running_loop().time() + self.lease_s)
        return KvSession(self, session_id, layout, announcer)

    def local_kv(self, session_id: str) -> torch.Tensor | PagedKv | None:
        """The KV a one-rank group still holds for an outgoing session (to decode it here instead), else None."""
        group = self.group
        if isinstance(group, InProcessGroup) and group.world == 1:
            return group.ranks[0].outbox.get(session_id)
        return None

    def lease_deadline(self, session_id: str) -> float:
        """When an outgoing session's KV must be gone (event-loop time)."""
        return self._leases[session_id]

    async def accept(self, offer: SessionOffer) -> OfferReply:
        """Decoder side: validate an offer; on success every rank posts its receives."""
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
        return SessionAccepted(spec_to_wire(self.spec), self.group.addresses())

    async def pull(self, session_id: str, timeout: float | None = None) -> PulledKv:
        """Decoder side: the session's KV once every rank's buffers arrived (the offer may come later).

        Raises `IncompatibleKvError` for a refused session and `KvTransferError` when the
        bytes do not all arrive intact within `timeout` (default: the lease); the session is
        then dropped on every rank. Either way nothing was written anywhere.
        """
        incoming = self._slot(session_id)
        limit = self.lease_s if timeout is None else timeout
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
        """Drops a session (sent, cancelled, given up, lease over): every rank frees its KV, receives stop."""
        self._leases.pop(session_id, None)
        self.group.drop(session_id)
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

    @property
    def num_incoming(self) -> int:
        return len(self._incoming)

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
        started = time.perf_counter()
        try:
            stats = await self.group.receive(offer.session_id, plan, offer.segments, offer.num_tokens, self.lease_s)
            result: PulledKv | BaseException = PulledKv(
                offer.session_id, plan, offer.num_tokens, TransferStats(stats.nbytes, time.perf_counter() - started, stats.num_messages), self.group
            )
        except KvTransferError as error:
            self.group.drop(offer.session_id)
            result = error
        except Exception as error:  # a rank failed unexpectedly: the session fails, the worker keeps serving
            self.group.drop(offer.session_id)
            result = KvTransferError(f"session {offer.session_id!r}: {error!r}")
        if not incoming.done.done():
            if isinstance(result, BaseException):
                incoming.done.set_exception(result)
            else:
                incoming.done.set_result(result)
