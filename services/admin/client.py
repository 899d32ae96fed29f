"""Talking to running services over NATS: micro discovery and JSON admin calls."""

from __future__ import annotations

import asyncio
import json

from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError

from shared.subjects import Subjects

PING_SUBJECT = "$SRV.PING"


class AdminCallError(RuntimeError):
    pass


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
        raise AdminCallError(f"{instance_id} has no {endpoint!r} endpoint (or is gone)") from None
    except NatsTimeoutError:
        raise AdminCallError(f"{instance_id} did not answer {endpoint!r} within {timeout:.0f}s") from None
    headers = reply.headers or {}
    if "Nats-Service-Error-Code" in headers:
        raise AdminCallError(f"{instance_id}: {headers.get('Nats-Service-Error', 'error')} (code {headers['Nats-Service-Error-Code']})")
    return json.loads(reply.data)
