"""What the leader tells every rank of its group: the step plan and the KV moves around it.

One msgspec message per broadcast (shared/ranks/channel.py), a tagged union decoded once:
- `Step`: the sequences of one forward pass, per DP group, with the block tables the ranks
  have not seen yet (a request's pages are reserved whole at admission, so its table never
  changes: sent once, forgotten when the request ends) — deltas, not whole state;
- `Export` / `Scatter`: a hand-off request's KV out of the ranks' pages (into their
  outboxes), or received KV into them; both between steps, in order with them;
- session moves (`Prepare`, `Send`, `Receive`, `Drop`): run by each rank's event loop;
- `Keepalive` while idle (no collective waits past its timeout), `Stop` at shutdown,
  `Probe` for admin status (each rank reports what it holds).
"""

from __future__ import annotations

import msgspec

from shared.protocol import KvSegment, WireKvSpec, WireLayout


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    pass


class Chunk(_Msg):
    """One sequence's tokens in a forward pass."""

    request_id: str
    num_cached: int  # tokens whose K/V are already in the cache
    num_new: int
    wants_logits: bool  # the pass samples a token for it (last chunk of a prompt, or a decode)
    input_ids: list[int]


class Step(_Msg, tag=1):
    groups: list[list[Chunk]]  # per DP group; an empty list: that group runs an empty batch
    tables: dict[str, list[int]] = {}  # block tables of requests new to the ranks
    forget: list[str] = []  # requests ended since the last step


class Export(_Msg, tag=2):
    """Every rank copies a hand-off request's KV (its layers and heads) out of its pages, into its outbox."""

    request_id: str
    block_table: list[int]
    num_tokens: int


class Scatter(_Msg, tag=3):
    """Every rank writes a received session's pair buffers into these pages of its cache."""

    session_id: str
    block_table: list[int]


class PlanKey(_Msg):
    """What a transfer plan is computed from (each rank computes it itself; it is cached)."""

    src_layout: WireLayout
    dst_layout: WireLayout
    src_spec: WireKvSpec
    dst_spec: WireKvSpec
    dst_dp_group: int


class Peer(_Msg):
    rank: int
    host: str
    port: int


class Prepare(_Msg, tag=4):
    session_id: str
    plan: PlanKey


class Send(_Msg, tag=5):
    session_id: str
    plan: PlanKey
    peers: list[Peer]


class Receive(_Msg, tag=6):
    session_id: str
    plan: PlanKey
    segments: list[KvSegment]
    num_tokens: int
    timeout: float


class Drop(_Msg, tag=7):
    session_id: str


class Keepalive(_Msg, tag=8):
    forget: list[str] = []  # requests ended since the last step (an idle group drops their tables too)


class Probe(_Msg, tag=10):
    """Every rank reports what it holds (admin status): block tables, sessions."""

    probe_id: str


class Stop(_Msg, tag=9):
    reason: str


Work = Step | Export | Scatter | Prepare | Send | Receive | Drop | Keepalive | Stop | Probe

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Work)


def encode(work: Work) -> bytes:
    return _encoder.encode(work)


def decode(data: bytes) -> Work:
    return _decoder.decode(data)
