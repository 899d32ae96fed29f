"""Process plumbing shared by every service: NATS connection and signal-driven stop."""

from __future__ import annotations

import asyncio
import signal
import time

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.errors import NoServersError

from shared.nats_auth import NatsAuthorizationError

log = structlog.get_logger()

FIRST_CONNECT_TIMEOUT_S = 30.0


async def connect_nats(
    url: str, name: str, first_connect_timeout: float = FIRST_CONNECT_TIMEOUT_S, options: dict | None = None
) -> NatsClient:
    """Connects, retrying for a while so a service started before nats-server waits for it.

    Once connected, the client reconnects forever: a NATS restart must not end a worker.
    `options` (credentials, TLS: shared/nats_auth.py) go to `nats.connect` as they are; a
    server that refuses them ends the first connect at once instead of retrying forever.
    """
    deadline = time.monotonic() + first_connect_timeout

    async def on_error(exc: Exception) -> None:
        if not client and "authorization violation" in str(exc).lower():
            raise NatsAuthorizationError(f"NATS at {url} refused this client's credentials (see --nats-creds)")
        log.warning("nats_error", error=repr(exc))

    client: list[NatsClient] = []

    async def on_disconnected() -> None:
        if client and not (client[0].is_closed or client[0].is_draining):
            log.warning("nats_disconnected", url=url)

    while True:
        try:
            nc = await nats.connect(
                servers=[url],
                name=name,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                **(options or {}),
            )
            client.append(nc)
            return nc
        except (NoServersError, OSError):
            if time.monotonic() > deadline:
                raise ConnectionError(f"cannot reach NATS at {url} after {first_connect_timeout:.0f}s") from None
            await asyncio.sleep(0.25)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: services await it, then shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def close_nats(nc: NatsClient, timeout: float = 2.0) -> None:
    """Drains if the server is there; otherwise (or if draining stalls) just closes.

    Bounded either way: a server that is gone must not keep a stopping service alive.
    """
    if nc.is_connected:
        try:
            await asyncio.wait_for(nc.drain(), timeout)
            return
        except Exception:
            pass
    try:
        await asyncio.wait_for(nc.close(), timeout)
    except Exception as exc:
        log.warning("nats_close_failed", error=repr(exc))
