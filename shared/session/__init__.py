"""The seed's session API: KV pushed by a prefill worker's ranks, pulled re-sharded by a decoder's.

Modules, by concern: `engine` (the leader's facade: create_session / push / accept / pull,
leases), `group` (the ranks as the leader sees them), `rank_transfer` (one rank's outbox,
inbox and transport), `rank_plan` (a plan in one rank's own layer and head numbers),
`pair_buffers` (pipelined gathers into staging), `received` (a rank's arrived buffers and
their scatter), `transport` (UCX), `announcer` (offers over NATS or in process), `wire`.
"""

from shared.kv_spec import IncompatibleKvError
from shared.protocol import SessionAccepted, SessionOffer, SessionRefused
from shared.session.announcer import LoopbackAnnouncer, SessionAnnouncer
from shared.session.engine import ExportedKv, KvSession, KvSessionEngine, PulledKv
from shared.session.errors import KvTransferError
from shared.session.group import InProcessGroup, RankGroup
from shared.session.pair_buffers import PagedKv
from shared.session.rank_transfer import RankTransfer
from shared.session.received import RankReceived
from shared.session.transport import KvTransport, UcxKvTransport
from shared.session.wire import layout_from_wire, layout_to_wire, spec_from_wire, spec_to_wire, wire_segments

__all__ = [
    "ExportedKv",
    "InProcessGroup",
    "IncompatibleKvError",
    "KvSession",
    "KvSessionEngine",
    "KvTransferError",
    "KvTransport",
    "LoopbackAnnouncer",
    "PagedKv",
    "PulledKv",
    "RankGroup",
    "RankReceived",
    "RankTransfer",
    "SessionAccepted",
    "SessionAnnouncer",
    "SessionOffer",
    "SessionRefused",
    "UcxKvTransport",
    "layout_from_wire",
    "layout_to_wire",
    "spec_from_wire",
    "spec_to_wire",
    "wire_segments",
]
