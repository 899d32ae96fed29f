"""Wire messages on NATS: small msgspec Structs, never bulk tensors.

Each subject carries one message type (or a tagged union for replies), decoded by a
decoder built once. KV bytes travel over UCX; NATS only carries their description.
"""

from __future__ import annotations

import enum

import msgspec


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    pass


class Role(enum.IntEnum):
    PREFILL = 1
    DECODE = 2
    BOTH = 3  # colocated: runs both phases, no hand-off

    @property
    def label(self) -> str:
        return self.name.lower()


class Path(enum.IntEnum):
    """Which way a request went; reported back to the client."""

    DISAGG = 1
    COLOCATED = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class FinishReason(enum.IntEnum):
    STOP = 1
    LENGTH = 2
    CANCELLED = 3
    ERROR = 4

    @property
    def label(self) -> str:
        return self.name.lower()


class ErrorCode(enum.IntEnum):
    BAD_REQUEST = 400
    TOO_MANY_REQUESTS = 429
    INTERNAL = 500
    UNAVAILABLE = 503


class Sampling(_Msg):
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely
    # Tokens generated before this job (a migrated request's continuation): the n-th token
    # drawn here is the request's (step_offset + n)-th, so seeded sampling goes on unchanged.
    step_offset: int = 0


class ServiceError(_Msg, tag=0):
    code: ErrorCode
    message: str


class PlaceRequest(_Msg):
    request_id: str
    model: str
    num_prompt_tokens: int
    max_tokens: int
    exclude: list[str] = []  # workers not to place on (a decoder that just failed a hand-off)
    decode_only: bool = False  # a prefill worker asks for another decoder for KV it already holds


class Placement(_Msg, tag=1):
    request_id: str
    path: Path
    prefill_worker: str
    decode_worker: str  # equals prefill_worker on the colocated path
    decode_layout: str = ""  # the decoder's layout ("dp=2,tp=2,pp=1,ep=1"): the push targets it
    decode_dp_group: int = 0  # the decoder's DP group that will hold the request
    # Which run of each worker was chosen: a worker restarted under the same id is a new
    # incarnation, and requests placed on the old one must still migrate.
    prefill_incarnation: str = ""
    decode_incarnation: str = ""


class PrefillJob(_Msg):
    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    path: Path
    decode_worker: str
    stream_subject: str
    decode_layout: str = ""
    decode_dp_group: int = 0


class KvSegment(_Msg):
    """One contiguous UCX message: everything src_rank sends dst_rank for a session."""

    src_rank: int
    dst_rank: int
    tag: int
    nbytes: int


# -- KV hand-off sessions (shared/session.py): the offer travels inside a DecodeJob.


class WireKvSpec(_Msg):
    model_fingerprint: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    page_size: int
    memory_layout: str
    num_experts: int = 0


class WireLayout(_Msg):
    kind: str  # "prefill" | "decode"
    dp: int
    tp: int
    pp: int
    ep: int


class SessionOffer(_Msg):
    """Prefill -> decoder: what is coming, so the decoder can validate and post receives."""

    session_id: str
    spec: WireKvSpec
    src_layout: WireLayout
    dst_layout: WireLayout
    dst_dp_group: int
    num_tokens: int
    segments: list[KvSegment]


class RankAddress(_Msg):
    """Where one rank of a worker instance receives KV (its own UCX listener)."""

    rank: int
    host: str
    port: int


class SessionAccepted(_Msg, tag=1):
    spec: WireKvSpec  # the decoder's, so the prefill side checks compatibility too
    addresses: list[RankAddress]  # every rank of the decoder; each prefill rank sends to the ranks it has pairs with


class SessionRefused(_Msg, tag=2):
    field: str
    message: str


OfferReply = SessionAccepted | SessionRefused


class DecodeJob(_Msg):
    request_id: str
    num_prompt_tokens: int
    first_token: int
    sampling: Sampling
    stream_subject: str
    offer: SessionOffer


class JobAccepted(_Msg, tag=2):
    worker_id: str


class CancelRequest(_Msg):
    request_id: str


class TransferStats(_Msg):
    nbytes: int
    seconds: float
    num_messages: int


class TokenLogprob(_Msg):
    """One generated token's log-probability and, when asked for, the most likely alternatives."""

    logprob: float
    top_ids: list[int] = []  # most likely first
    top_logprobs: list[float] = []


class TokenEvent(_Msg):
    """Tokens for the gateway. `finish_reason` is set on the last event of a request."""

    request_id: str
    worker_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None
    kv_transfer: TransferStats | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them
    error_code: ErrorCode | None = None  # with an error: UNAVAILABLE means "try elsewhere", not a bug
    decode_worker: str = ""  # set by the prefill worker when the request continues on another decoder than placed


class Heartbeat(_Msg):
    worker_id: str
    role: Role
    model: str
    model_fingerprint: str
    ucx_host: str
    ucx_port: int
    running: int
    waiting: int
    free_kv_blocks: int
    total_kv_blocks: int
    queued_prefill_tokens: int
    sent_at: float
    kv_bytes_per_token: int = 0
    draining: bool = False
    # Measured by the worker (0 until known): the scheduler's auto mode prefers these.
    prefill_tokens_per_s: float = 0.0
    handoff_bytes_per_s: float = 0.0
    metrics_port: int = 0
    layout: str = ""  # this worker's parallel layout, e.g. "tp=4,pp=1,ep=4"
    dp_load: list[int] = []  # per attention-DP group: running + queued requests (dp > 1 only)
    incarnation: str = ""  # new on every start of the process, so a restart under the same id is seen


class WorkerDown(_Msg):
    """Scheduler -> gateways: a worker stopped beating (or came back as a new incarnation).

    Every scheduler publishes it, so gateways see duplicates: handling one twice is harmless.
    """

    worker_id: str
    incarnation: str
    reason: str


PlaceReply = Placement | ServiceError
JobReply = JobAccepted | ServiceError
HandoffReply = SessionAccepted | SessionRefused | ServiceError

_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decoder(kind: type) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kind)


# -- Readiness (gateway /health -> any scheduler): can this model be served right now?


class ReadinessRequest(_Msg):
    model: str


class Readiness(_Msg, tag=1):
    ready: bool
    mode: str  # the scheduler's placement mode, which decides the workers needed
    missing: list[str] = []  # what is lacking, e.g. ["decode worker"]
    prefill_workers: int = 0  # live, not draining, serving the model
    decode_workers: int = 0
    both_workers: int = 0


ReadinessReply = Readiness | ServiceError
