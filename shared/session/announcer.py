"""How a session's offer reaches its decoder and the answer comes back (NATS in services)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import msgspec

from shared.protocol import OfferReply, SessionOffer, SessionRefused

if TYPE_CHECKING:
    from shared.session.engine import KvSessionEngine


class SessionAnnouncer(Protocol):
    """Carries a `SessionOffer` to the decoder and its reply back."""

    async def offer(self, offer: SessionOffer, decoder: str | None) -> OfferReply: ...


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
