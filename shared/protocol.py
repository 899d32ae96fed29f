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


class ServiceError(_Msg, tag=0):
    code: ErrorCode
    message: str


class PlaceRequest(_Msg):
    request_id: str
    model: str
    num_prompt_tokens: int
    max_tokens: int


class Placement(_Msg, tag=1):
    request_id: str
    path: Path
    prefill_worker: str
    decode_worker: str  # equals prefill_worker on the colocated path


class PrefillJob(_Msg):
    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    path: Path
    decode_worker: str
    stream_subject: str


class KvSegment(_Msg):
    """One contiguous UCX message: everything src_rank sends dst_rank for a session."""

    src_rank: int
    dst_rank: int
    tag: int
    nbytes: int


class KvDescriptor(_Msg):
    """What the decoder must know to receive and place a session's KV."""

    model_fingerprint: str
    dtype: str
    shape: list[int]  # [layers, 2, tokens, kv_heads, head_dim]
    segments: list[KvSegment]


class DecodeJob(_Msg):
    request_id: str
    num_prompt_tokens: int
    first_token: int
    sampling: Sampling
    kv: KvDescriptor
    stream_subject: str


class JobAccepted(_Msg, tag=2):
    worker_id: str


class KvReady(_Msg, tag=3):
    """The decoder accepted a hand-off and posted its receives: send the bytes here."""

    worker_id: str
    ucx_host: str
    ucx_port: int


class CancelRequest(_Msg):
    request_id: str


class TransferStats(_Msg):
    nbytes: int
    seconds: float
    num_messages: int


class TokenEvent(_Msg):
    """Tokens for the gateway. `finish_reason` is set on the last event of a request."""

    request_id: str
    worker_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None
    kv_transfer: TransferStats | None = None


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


PlaceReply = Placement | ServiceError
JobReply = JobAccepted | ServiceError
HandoffReply = KvReady | ServiceError

_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decoder(kind: type) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kind)
