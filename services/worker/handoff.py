"""The session API wired to NATS and UCX: how workers push and pull KV (shared/session.py).

The prefill side's announcer carries a session's offer inside a DecodeJob to the chosen
decoder; the decoder answers with its spec and UCX address (or a refusal naming the
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
from shared.session import KvSessionEngine, UcxKvTransport
from shared.subjects import Subjects
from shared.transport.ucx_kv import KvReceiver, KvSender

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


@dataclass
class PendingDecode:
    """What the decoder needs besides the KV: the request's identity and where tokens go."""

    decode_worker: str
    num_prompt_tokens: int
    first_token: int
    sampling: Sampling
    stream_subject: str


class NatsAnnouncer:
    """Delivers a session offer to its decoder as part of the request's DecodeJob."""

    def __init__(self, nc: NatsClient, subjects: Subjects):
        self.nc = nc
        self.subjects = subjects
        self.pending: dict[str, PendingDecode] = {}

    async def offer(self, offer: SessionOffer, decoder: str | None) -> OfferReply:
        pending = self.pending.pop(offer.session_id)
        job = DecodeJob(offer.session_id, pending.num_prompt_tokens, pending.first_token, pending.sampling, pending.stream_subject, offer)
        try:
            reply = await self.nc.request(
                self.subjects.worker_decode(pending.decode_worker), protocol.encode(job), timeout=HANDOFF_REQUEST_TIMEOUT_S
            )
            answer = _handoff_reply.decode(reply.data)
        except Exception as exc:  # no responder, timeout, undecodable reply
            return SessionRefused("decoder", f"decoder {pending.decode_worker} unreachable: {exc!r}")
        if isinstance(answer, ServiceError):
            return SessionRefused("decoder", answer.message)
        return answer


def session_engine(
    nc: NatsClient, subjects: Subjects, spec: KvSpec, layout: Layout, sender: KvSender, receiver: KvReceiver
) -> tuple[KvSessionEngine, NatsAnnouncer]:
    announcer = NatsAnnouncer(nc, subjects)
    # Strict dtypes: a hand-off between workers of different KV dtypes is refused by name
    # (the re-shard kernels can cast, but silently changing precision is the operator's call).
    sessions = KvSessionEngine(
        spec, layout, UcxKvTransport(sender=sender, receiver=receiver), announcer, allow_dtype_cast=False
    )
    return sessions, announcer


def parse_worker_layout(role: Role, text: str) -> Layout:
    return parse_layout(text, "prefill" if role is Role.PREFILL else "decode")


