"""Ranks answering their leader: what each rank is (at start) and how its KV moves went.

Both ride on the group's rendezvous store (a TCP key-value store rank 0 hosts, reachable
from every host of the group), not on the process group: a report is occasional and
asynchronous (a send finishing on its own time), and a collective would make every rank
wait for it. Rank descriptions are keys; move reports go through one store queue that a
thread of the leader pops (blocking, no polling) and hands to the waiting coroutines.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections import defaultdict

import msgspec
import structlog
import torch.distributed as dist

log = structlog.get_logger()

QUEUE = "pdserve/reports"
STALE_S = 120.0  # reports of a move nobody waits for are dropped after this
_RANK_KEY = "pdserve/rank/{}"


class RankInfo(msgspec.Struct, array_like=True, omit_defaults=True):
    """One rank, as `pdserve admin status` lists it."""

    rank: int
    pid: int
    host: str
    device: str
    ucx_host: str
    ucx_port: int


class RankReport(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one rank reports to its leader: how its part of a KV move ended, or its answer to a probe or KV sample."""

    op: str  # "send" | "receive" | "probe" | "kv"
    session_id: str
    rank: int
    ok: bool
    nbytes: int = 0
    seconds: float = 0.0
    messages: int = 0
    error: str = ""
    bytes_sent: int = 0  # the rank's totals so far (admin, metrics)
    bytes_received: int = 0
    tables: int = 0  # block tables of requests the rank holds (probe)
    sessions: int = 0  # KV sessions holding memory on the rank (probe)
    shape: list[int] = []  # a KV sample's [layers, 2, tokens, heads, head_dim] (empty: the rank holds none of it)
    values: list[float] = []  # the sample, flattened


_info_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(RankInfo))
_report_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(RankReport))


def describe_rank(rank: int, device: str, ucx_host: str, ucx_port: int) -> RankInfo:
    return RankInfo(rank, os.getpid(), socket.gethostname(), device, ucx_host, ucx_port)


def publish_info(store: dist.Store, info: RankInfo) -> None:
    store.set(_RANK_KEY.format(info.rank), _info_codec[0].encode(info))


def read_infos(store: dist.Store, world: int) -> list[RankInfo]:
    """Every rank's description (waits for them, within the store's timeout)."""
    keys = [_RANK_KEY.format(r) for r in range(world)]
    store.wait(keys)
    return [_info_codec[1].decode(store.get(key)) for key in keys]


def post_report(store: dist.Store, report: RankReport) -> None:
    store.queue_push(QUEUE, _report_codec[0].encode(report))


class ReportBoard:
    """The leader's side: a thread pops reports; `collect` waits for the ranks of one move."""

    def __init__(self, store: dist.Store, loop: asyncio.AbstractEventLoop):
        self._store = store
        self._loop = loop
        self._arrived: dict[tuple[str, str], dict[int, RankReport]] = defaultdict(dict)
        self._first_seen: dict[tuple[str, str], float] = {}
        self._waiters: dict[tuple[str, str], tuple[set[int], asyncio.Future]] = {}
        self.totals: dict[int, tuple[int, int]] = {}  # rank -> (bytes sent, bytes received) as last reported
        self._thread = threading.Thread(target=self._pop_forever, name="rank-reports", daemon=True)
        self._thread.start()

    def _pop_forever(self) -> None:
        while True:
            try:
                data = self._store.queue_pop(QUEUE)
            except Exception as exc:  # the store's timeout with nothing to pop, or the group is gone
                if "timeout" in str(exc).lower() or "Timed out" in str(exc):
                    continue
                log.warning("rank_reports_stopped", error=str(exc))
                return
            report = _report_codec[1].decode(data)
            self._loop.call_soon_threadsafe(self._arrive, report)

    def _arrive(self, report: RankReport) -> None:
        self.totals[report.rank] = (report.bytes_sent, report.bytes_received)
        key = (report.op, report.session_id)
        now = self._loop.time()
        for stale in [k for k, at in self._first_seen.items() if now - at > STALE_S and k not in self._waiters]:
            self._arrived.pop(stale, None)  # a late report of a move nobody waits for any more
            del self._first_seen[stale]
        self._first_seen.setdefault(key, now)
        self._arrived[key][report.rank] = report
        waiter = self._waiters.get(key)
        if waiter is not None and waiter[0] <= self._arrived[key].keys() and not waiter[1].done():
            waiter[1].set_result([self._arrived[key][r] for r in sorted(waiter[0])])

    async def collect(self, op: str, session_id: str, ranks: set[int], timeout: float) -> list[RankReport]:
        """The reports of `ranks` for one move, once all arrived; TimeoutError after `timeout`."""
        key = (op, session_id)
        future = self._loop.create_future()
        self._waiters[key] = (ranks, future)
        if ranks <= self._arrived[key].keys():
            future.set_result([self._arrived[key][r] for r in sorted(ranks)])
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.pop(key, None)
            self._arrived.pop(key, None)
            self._first_seen.pop(key, None)

    def forget(self, session_id: str) -> None:
        """Drops reports of a session nobody waits for any more (late arrivals are dropped too)."""
        for key in [k for k in self._arrived if k[1] == session_id]:
            del self._arrived[key]
            self._first_seen.pop(key, None)
