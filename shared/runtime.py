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
from shared.nats_failover import Backoff, FailoverPlan, parse_nats_urls

log = structlog.get_logger()

FIRST_CONNECT_TIMEOUT_S = 30.0
# A server that stops answering (a cut link, not a closed socket) is given up after
# PING_INTERVAL_S * (MAX_OUTSTANDING_PINGS + 1) seconds, then the next one is tried.
PING_INTERVAL_S = 5
MAX_OUTSTANDING_PINGS = 2


async def connect_nats(
    url: str, name: str, first_connect_timeout: float = FIRST_CONNECT_TIMEOUT_S, options: dict | None = None
) -> NatsClient:
    """Connects to one of `url`'s servers (comma-separated, tried in order), retrying with
    backoff for a while so a service started before nats-server waits for it.

    Once connected, the client reconnects forever, to whichever server of the cluster
    answers: a NATS node dying must not end a service. One log line per backoff step.
    `options` (credentials, TLS: shared/nats_auth.py) go to `nats.connect` as they are; a
    server that refuses them ends the first connect at once instead of retrying forever.
    """
    servers = parse_nats_urls(url)
    plan = FailoverPlan()
    connection: list[NatsClient] = []
    deadline = time.monotonic() + first_connect_timeout
    first_attempt = 0
    while True:
        try:
            nc = await nats.connect(**_client_options(servers, name, plan, connection), **(options or {}))
        except (NoServersError, OSError) as exc:
            first_attempt += 1
            wait = Backoff().delay(first_attempt)
            if time.monotonic() + wait > deadline:
                raise ConnectionError(
                    f"cannot reach NATS at {', '.join(servers)} after {first_connect_timeout:.0f}s ({plan.last_error or exc!r})"
                ) from None
            log.warning("nats_unreachable", servers=servers, attempt=first_attempt, retry_in_s=round(wait, 2), error=plan.last_error)
            await asyncio.sleep(wait)
            continue
        # The first connection tried each server twice (so it could give up above); from
        # now on, never give up on a server: the handler below paces the attempts.
        nc.options["max_reconnect_attempts"] = -1
        connection.append(nc)
        plan.connected(_server_of(nc))
        return nc


def _server_of(nc: NatsClient) -> str | None:
    url = nc.connected_url
    return url.netloc if url is not None else None


def _client_options(servers: list[str], name: str, plan: FailoverPlan, connection: list[NatsClient]) -> dict:
    async def on_error(exc: Exception) -> None:
        if not connection and "authorization violation" in str(exc).lower():
            raise NatsAuthorizationError(f"NATS at {', '.join(servers)} refused this client's credentials (see --nats-creds)")
        if connection and connection[0].is_connected:
            log.warning("nats_error", error=repr(exc))
        else:  # a failed (re)connect attempt: reported once per step by the lines below
            plan.last_error = repr(exc)

    async def on_disconnected() -> None:
        if connection and not (connection[0].is_closed or connection[0].is_draining):
            plan.disconnected()
            log.warning("nats_disconnected", server=plan.lost)

    async def on_reconnected() -> None:
        log.info("nats_reconnected", server=_server_of(connection[0]), lost=plan.lost, attempts=plan.attempt)
        plan.connected(_server_of(connection[0]))

    def choose_server(pool, _info):
        index, wait = plan.next([(server.uri.netloc, server.reconnects) for server in pool])
        log.warning(
            "nats_reconnecting", server=pool[index].uri.netloc, attempt=plan.attempt, wait_s=round(wait, 2), error=plan.last_error
        )
        return pool[index], wait

    return dict(
        servers=servers,
        name=name,
        dont_randomize=True,  # the order given is the preference: nearest node first
        connect_timeout=2,
        allow_reconnect=True,
        # For the first connection only (see connect_nats): each server is tried twice,
        # 50 ms apart, then nats.connect gives up and our backoff takes over.
        max_reconnect_attempts=1,
        reconnect_time_wait=0.05,
        ping_interval=PING_INTERVAL_S,
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        reconnect_to_server_handler=choose_server,
    )


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
