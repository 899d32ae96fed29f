"""The gateway's drain on SIGTERM: stop taking requests, let streams finish, end the rest.

`draining` makes new requests and /health answer 503 with Retry-After at once (a load
balancer moves traffic away); requests in flight keep streaming until they finish or the
drain timeout passes; then each left is ended with an OpenAI-style error event and
`[DONE]` (or a 503 body), and its workers are told to stop.
"""

from __future__ import annotations

import asyncio

import structlog

from services.gateway.app import Gateway

log = structlog.get_logger()

POLL_S = 0.05
FLUSH_S = 3.0  # after the timeout: time for handlers to write their error event and [DONE]


async def drain(gateway: Gateway, timeout_s: float) -> int:
    """Returns how many requests had to be ended by the timeout."""
    gateway.draining = True
    log.info("gateway_draining", in_flight=len(gateway.in_flight), timeout_s=timeout_s)
    if await _until_idle(gateway, timeout_s):
        return 0
    ended = len(gateway.in_flight)
    why = f"the gateway is shutting down: the request did not finish within the drain timeout of {timeout_s:g}s"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FLUSH_S
    # Again and again: a request still being placed joins the dispatcher a moment later.
    while gateway.in_flight and loop.time() < deadline:
        gateway.dispatcher.interrupt_all(why)
        await asyncio.sleep(POLL_S)
    log.warning("gateway_drain_timed_out", ended=ended)
    return ended


async def _until_idle(gateway: Gateway, timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while gateway.in_flight and loop.time() < deadline:
        await asyncio.sleep(POLL_S)
    return not gateway.in_flight
