"""API keys at the gateway: `Authorization: Bearer <key>`, as OpenAI clients send `api_key`.

Keys come from `--api-key` (repeatable) or `PDSERVE_API_KEY` (comma-separated). Without
any key the gateway is open (and says so when it starts). A missing or wrong key gets a
401 with OpenAI's error body; every configured key is compared in constant time, all of
them every time, so neither timing nor the number of keys tells how close a guess was.
Health, liveness and metrics stay open for probes and scrapers (the middleware is in app.py;
this module stays free of heavy imports because the CLI reads its flags).
"""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Sequence

ENV_API_KEY = "PDSERVE_API_KEY"
OPEN_PATHS = frozenset({"/health", "/live", "/metrics"})
_BEARER = "bearer "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help=f"accept requests carrying this key (Authorization: Bearer KEY); repeatable; env {ENV_API_KEY} (comma-separated)",
    )


def configured_keys(flags: Sequence[str] | None, environ: dict[str, str] = os.environ) -> list[str]:
    """Keys from the flags, else from the environment; a key with a comma or space is refused."""
    keys = list(flags) if flags else [k.strip() for k in environ.get(ENV_API_KEY, "").split(",") if k.strip()]
    for key in keys:
        if not key or any(c in key for c in ", \t\r\n"):
            raise ValueError(f"--api-key: a key must be non-empty, without commas or spaces, got {key!r}")
    return keys


class ApiKeys:
    def __init__(self, keys: Sequence[str]):
        self._keys = [key.encode() for key in keys]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def accepts(self, presented: str) -> bool:
        candidate = presented.encode("utf-8", "surrogatepass")  # never raises, one-to-one
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    def refusal(self, authorization: str | None) -> str | None:
        """Why a request with this Authorization header is refused (401), or None."""
        if not authorization or authorization[: len(_BEARER)].lower() != _BEARER:
            return "You didn't provide an API key. Send it in an Authorization header using Bearer auth (Authorization: Bearer YOUR_KEY)."
        if not self.accepts(authorization[len(_BEARER) :].strip()):
            return "Incorrect API key provided."
        return None
