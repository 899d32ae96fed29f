"""/health: can this gateway serve its model right now? Asked of a scheduler, cached briefly.

Ready means NATS is connected, a scheduler answers, and it knows live workers for every
phase its placement mode needs (services/scheduler/readiness.py decides). Orchestrators
probe often, so an answer is reused for `ttl_s` and concurrent probes share one check.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError

from shared import protocol
from shared.protocol import Readiness, ReadinessReply, ReadinessRequest, ServiceError
from shared.subjects import Subjects

CHECK_TIMEOUT_S = 0.5
CACHE_TTL_S = 1.0

_reply = protocol.decoder(ReadinessReply)


@dataclass(frozen=True)
class HealthReport:
    ready: bool
    body: dict = field(default_factory=dict)

    @property
    def status(self) -> int:
        return 200 if self.ready else 503


class ReadinessProbe:
    def __init__(self, nc: NatsClient, subjects: Subjects, model: str, ttl_s: float = CACHE_TTL_S, clock=time.monotonic):
        self.nc = nc
        self.subjects = subjects
        self.model = model
        self.ttl_s = ttl_s
        self._clock = clock
        self._cached: tuple[float, HealthReport] | None = None
        self._lock = asyncio.Lock()

    async def report(self) -> HealthReport:
        async with self._lock:  # probes arriving together wait for one check
            if self._cached is not None and self._clock() - self._cached[0] < self.ttl_s:
                return self._cached[1]
            report = await self._check()
            self._cached = (self._clock(), report)
            return report

    async def _check(self) -> HealthReport:
        if not self.nc.is_connected:
            return self._unavailable(["nats"], "not connected to any NATS server (reconnecting)")
        request = protocol.encode(ReadinessRequest(self.model))
        try:
            raw = await self.nc.request(self.subjects.ready, request, timeout=CHECK_TIMEOUT_S)
        except NoRespondersError:
            return self._unavailable(["scheduler"], "no scheduler is running")
        except NatsTimeoutError:
            return self._unavailable(["scheduler"], f"no scheduler answered within {CHECK_TIMEOUT_S}s")
        reply = _reply.decode(raw.data)
        if isinstance(reply, ServiceError):
            return self._unavailable(["scheduler"], f"the scheduler refused the check: {reply.message}")
        return self._from_scheduler(reply)

    def _from_scheduler(self, reply: Readiness) -> HealthReport:
        workers = {"prefill": reply.prefill_workers, "decode": reply.decode_workers, "both": reply.both_workers}
        if not reply.ready:
            detail = f"no live {' and no live '.join(reply.missing)} serves model {self.model!r} (mode {reply.mode})"
            return self._unavailable(list(reply.missing), detail, mode=reply.mode, workers=workers)
        return HealthReport(True, {"status": "ready", "model": self.model, "mode": reply.mode, "workers": workers})

    def _unavailable(self, missing: list[str], detail: str, **extra) -> HealthReport:
        return HealthReport(False, {"status": "unavailable", "model": self.model, "missing": missing, "detail": detail, **extra})
