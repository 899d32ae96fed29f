"""Talking to running services over NATS: micro discovery and JSON admin calls."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.errors import ConnectionClosedError, NoRespondersError, TimeoutError as NatsTimeoutError

from services.admin.connection import LOST, NatsUnreachable
from shared.subjects import Subjects

PING_SUBJECT = "$SRV.PING"

NO_ANSWER = "no answer"  # nobody serves the endpoint, or it did not answer in time
SERVICE_ERROR = "service error"  # the service answered with an error


class AdminCallError(RuntimeError):
    def __init__(self, message: str, cause: str = SERVICE_ERROR, gone: bool = False):
        super().__init__(message)
        self.cause = cause
        self.gone = gone  # no responders: the instance (or this endpoint of it) does not exist


async def discover(nc: NatsClient, prefix: str, wait_s: float = 0.5) -> list[dict]:
    """Every pdserve service answering `$SRV.PING` for this prefix, sorted by kind and id."""
    replies: list[dict] = []
    inbox = nc.new_inbox()

    async def collect(msg) -> None:
        if msg.data:  # an empty reply is the server's "no responders" status
            replies.append(json.loads(msg.data))

    subscription = await nc.subscribe(inbox, cb=collect)
    await nc.publish(PING_SUBJECT, b"", reply=inbox)
    await asyncio.sleep(wait_s)
    await subscription.unsubscribe()
    ours = [r for r in replies if r.get("name", "").startswith("pdserve-") and r.get("metadata", {}).get("prefix") == prefix]
    return sorted(ours, key=lambda r: (r["metadata"]["kind"], r["metadata"]["instance"]))


async def call(nc: NatsClient, subjects: Subjects, instance_id: str, endpoint: str, body: dict | None = None, timeout: float = 5.0) -> dict:
    subject = subjects.admin(instance_id, endpoint)
    try:
        reply = await nc.request(subject, json.dumps(body or {}).encode(), timeout=timeout)
    except NoRespondersError:
        raise AdminCallError(f"{instance_id} has no {endpoint!r} endpoint (or is gone)", NO_ANSWER, gone=True) from None
    except NatsTimeoutError:
        raise AdminCallError(f"{instance_id} did not answer {endpoint!r} within {timeout:g}s", NO_ANSWER) from None
    headers = reply.headers or {}
    if "Nats-Service-Error-Code" in headers:
        raise AdminCallError(f"{instance_id}: {headers.get('Nats-Service-Error', 'error')} (code {headers['Nats-Service-Error-Code']})")
    return json.loads(reply.data)


@dataclass
class AdminSession:
    """One command's connection: where it is, how long to wait, and the calls it makes."""

    nc: NatsClient
    url: str
    subjects: Subjects
    timeout: float

    async def discover(self) -> list[dict]:
        return await self._guarded(discover(self.nc, self.subjects.prefix))

    async def call(self, instance_id: str, endpoint: str, body: dict | None = None, timeout: float | None = None) -> dict:
        return await self._guarded(call(self.nc, self.subjects, instance_id, endpoint, body, timeout or self.timeout))

    async def instances(self, kind: str) -> list[str]:
        return [s["metadata"]["instance"] for s in await self.discover() if s["metadata"]["kind"] == kind]

    async def _guarded(self, awaitable):
        """A server lost mid-command is NatsUnreachable, not a service's fault (no reconnects)."""
        try:
            result = await awaitable
        except (AdminCallError, ConnectionClosedError, OSError):
            if self.nc.is_closed or not self.nc.is_connected:
                raise NatsUnreachable(self.url, LOST) from None
            raise
        return result
