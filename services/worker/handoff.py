"""The session API wired to NATS: a session's offer travels inside the request's DecodeJob.

The decoder answers with its spec and every rank's UCX address (or a refusal naming the
field) before any byte moves.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.aio.client import Client as NatsClient

from shared import protocol
from shared.engine.engine import Engine
from shared.engine.loader import LoadedModel
from shared.kv_spec import KvSpec, spec_of_model
from shared.layouts import Layout, PrefillLayout, parse_layout
from shared.protocol import DecodeJob, HandoffReply, OfferReply, Role, Sampling, ServiceError, SessionOffer, SessionRefused
from shared.subjects import Subjects

HANDOFF_REQUEST_TIMEOUT_S = 5.0
_handoff_reply = protocol.decoder(HandoffReply)


def kv_spec_of(model: LoadedModel, engine: Engine) -> KvSpec:
    return spec_of_model(model.config, dtype=engine.kv_dtype, page_size=engine.block_size)


def outgoing_layout(role: Role, layout: Layout) -> PrefillLayout:
    """How this worker holds a prompt's KV when it pushes it."""
    if isinstance(layout, PrefillLayout):
        return layout
    if layout.dp != 1:
        raise ValueError(f"a {role.label} worker with dp={layout.dp} cannot prefill for another decoder")
    return PrefillLayout(tp=layout.tp, pp=layout.pp, ep=layout.ep)


@dataclass(frozen=True)
class DecodeJobOffer:
    """Announces one request's session to its decoder as that request's DecodeJob (NATS request/reply)."""

    nc: NatsClient
    subjects: Subjects
    num_prompt_tokens: int
    first_token: int
    sampling: Sampling
    stream_subject: str

    async def offer(self, offer: SessionOffer, decoder: str | None) -> OfferReply:
        if decoder is None:
            return SessionRefused("decoder", "a DecodeJob names its decoder")
        job = DecodeJob(offer.session_id, self.num_prompt_tokens, self.first_token, self.sampling, self.stream_subject, offer)
        try:
            reply = await self.nc.request(self.subjects.worker_decode(decoder), protocol.encode(job), timeout=HANDOFF_REQUEST_TIMEOUT_S)
            answer = _handoff_reply.decode(reply.data)
        except Exception as exc:  # no responder, timeout, undecodable reply
            return SessionRefused("decoder", f"decoder {decoder} unreachable: {exc!r}")
        if isinstance(answer, ServiceError):
            return SessionRefused("decoder", f"decoder {decoder} refused: {answer.message}")
        return answer


def parse_worker_layout(role: Role, text: str) -> Layout:
    return parse_layout(text, "prefill" if role is Role.PREFILL else "decode")
