"""Several NATS servers: which URLs, which server next, and how long to wait before trying it.

Pure policy, no I/O (`shared/runtime.connect_nats` is the shell that uses it):

- `parse_nats_urls("nats://a:4222,b")` -> `["nats://a:4222", "nats://b:4222"]`. The URLs
  come from `--nats` or, when the flag is absent, the `PDSERVE_NATS` environment variable.
  Servers are tried in the order given: list the nearest node first.
- `Backoff`: exponential with "equal jitter" (half the step fixed, half random), so a
  fleet that lost its server does not reconnect in lockstep.
- `FailoverPlan` picks the next server after a disconnect (never the one just lost while
  another is untried) and says how long to wait first, one logged line per step.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

NATS_ENV = "PDSERVE_NATS"
DEFAULT_PORT = 4222
_SCHEMES = ("nats", "tls")


def nats_urls_from(flag_value: str | None) -> str | None:
    """The `--nats` value, else `$PDSERVE_NATS`, else None."""
    return flag_value or os.environ.get(NATS_ENV) or None


def parse_nats_urls(text: str) -> list[str]:
    """Comma-separated NATS URLs, normalised to `scheme://host:port`; ValueError names the bad one."""
    urls = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        candidate = part if "://" in part else f"nats://{part}"
        parsed = urlsplit(candidate)
        try:
            port = parsed.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{part!r} has a bad port") from None
        if parsed.scheme not in _SCHEMES or not parsed.hostname:
            raise ValueError(f"{part!r} is not a NATS URL (nats://HOST:PORT)")
        userinfo = parsed.netloc.rpartition("@")[0]
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        urls.append(f"{parsed.scheme}://{userinfo + '@' if userinfo else ''}{host}:{port}")
    if not urls:
        raise ValueError(f"no NATS URL in {text!r}")
    return list(dict.fromkeys(urls))  # a server named twice is tried once


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait before attempt `n` (0-based): 0 at first, then base·2^(n-1) capped, jittered."""

    base_s: float = 0.1
    cap_s: float = 5.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        if attempt <= 0:
            return 0.0
        step = min(self.cap_s, self.base_s * 2 ** min(attempt - 1, 30))
        return step / 2 + step / 2 * rng()


@dataclass
class FailoverPlan:
    """Reconnection state of one client: attempts since the link was lost, and which server was lost."""

    backoff: Backoff = field(default_factory=Backoff)
    attempt: int = 0
    server: str | None = None  # host:port of the server we are connected to
    lost: str | None = None  # the one we were connected to before the link went
    last_error: str = ""

    def connected(self, server: str | None) -> None:
        self.server = server
        self.attempt = 0
        self.last_error = ""

    def disconnected(self) -> None:
        self.lost, self.server = self.server, None
        self.attempt = 0

    def next(self, servers: Sequence[tuple[str, int]]) -> tuple[int, float]:
        """`servers`: (host:port, failed attempts since it last worked) in pool order.

        Returns the index of the server to try and the seconds to wait first. The least
        failed server wins; among equals, one other than the server just lost, then pool order.
        """
        order = sorted(range(len(servers)), key=lambda i: (servers[i][1], servers[i][0] == self.lost, i))
        delay = self.backoff.delay(self.attempt)
        self.attempt += 1
        return order[0], delay
