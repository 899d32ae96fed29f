"""Admin's own way to NATS: one bounded attempt, never a reconnect loop, one clear cause.

Services retry on purpose (shared/runtime.connect_nats: a worker started before
nats-server waits for it). An operator's command must instead answer within seconds:
connected, or a `NatsUnreachable` naming the URL and why (refused, timed out,
authorization violation, host not found, no route). Once connected, the client does not
reconnect either: a lost server ends the command with the same kind of answer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from nats.aio.client import Client as NatsClient
from nats.errors import AuthorizationError, Error as NatsError, NoServersError

REFUSED = "connection refused"
TIMED_OUT = "timed out"
AUTHORIZATION = "authorization violation"
HOST_NOT_FOUND = "host not found"
NO_ROUTE = "no route to host"
LOST = "connection lost"
FAILED = "connection failed"


class NatsUnreachable(Exception):
    def __init__(self, url: str, cause: str, detail: str = ""):
        self.url = url
        self.cause = cause
        self.detail = detail
        super().__init__(f"cannot reach NATS at {url}: {cause}" + (f" ({detail})" if detail else ""))


def cause_of(exc: BaseException) -> tuple[str, str]:
    """(cause, detail) for what a connection attempt raised or reported."""
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED, ""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return TIMED_OUT, ""
    if isinstance(exc, socket.gaierror):
        return HOST_NOT_FOUND, exc.strerror or ""
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return NO_ROUTE, exc.strerror or ""
    if isinstance(exc, AuthorizationError) or "authorization violation" in str(exc).lower():
        return AUTHORIZATION, ""
    if isinstance(exc, NatsError) and str(exc).startswith("nats: "):
        return FAILED, str(exc).removeprefix("nats: ").strip("'")
    return FAILED, str(exc) or type(exc).__name__


def quiet_nats_logging() -> None:
    """nats.py logs every failed attempt and read error itself; admin reports one line instead."""
    logging.getLogger("nats").setLevel(logging.CRITICAL + 1)


SCHEMES = ("nats", "tls", "ws", "wss")


def check_url(url: str) -> str | None:
    """Why `url` (one URL or a comma-separated cluster) is not a NATS URL, if it is not."""
    for server in url.split(","):
        scheme, sep, _ = server.strip().partition("://")
        if sep and scheme not in SCHEMES:
            return f"{server.strip()!r} is not a NATS URL (nats://HOST:PORT; also {', '.join(SCHEMES[1:])})"
    return None


async def connect_admin(url: str, timeout: float, options: dict | None = None, name: str = "pd-admin") -> NatsClient:
    """Connected within `timeout` seconds, or NatsUnreachable with the first cause seen.

    `options`: credentials, TLS and inbox prefix for nats.connect (shared/nats_auth.py).
    """
    quiet_nats_logging()
    reported: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        reported.append(exc)

    nc = NatsClient()
    servers = [server.strip() for server in url.split(",") if server.strip()]  # a cluster: a,b,c
    try:
        # max_reconnect_attempts=1 with no wait: nats.py tries each server twice at most
        # before NoServersError (0 would mean "forever" inside its server selection).
        await asyncio.wait_for(
            nc.connect(
                servers=servers,
                dont_randomize=True,  # the first URL named is the first tried
                name=name,
                connect_timeout=timeout,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                error_cb=on_error,
                **(options or {}),
            ),
            timeout,
        )
    except (NoServersError, OSError, NatsError, asyncio.TimeoutError) as exc:
        await _close_quietly(nc)
        first = reported[0] if reported and isinstance(exc, NoServersError) else exc
        raise NatsUnreachable(url, *cause_of(first)) from None
    return nc


async def _close_quietly(nc: NatsClient) -> None:
    try:
        await asyncio.wait_for(nc.close(), 1.0)
    except Exception:
        pass
