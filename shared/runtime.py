"""Process plumbing shared by every service: NATS connection and signal-driven stop."""

from __future__ import annotations

import asyncio
import signal

import nats
from nats.aio.client import Client as NatsClient


async def connect_nats(url: str, name: str) -> NatsClient:
    """Connects with bounded retries, so a service started before nats-server waits briefly."""
    return await nats.connect(
        servers=[url],
        name=name,
        connect_timeout=2,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
        retry_on_failed_connect=True,
    )


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: services await it, then shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
