"""The engine's home in a worker: one thread runs every engine call, in order.

torch releases the GIL, so the asyncio loop keeps heartbeats, cancels and token
streams flowing while a forward pass runs. Decoding is a task that steps every
running sequence together until none is left, then sleeps until woken.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from shared.engine.engine import Engine, TokenOutput

log = structlog.get_logger()

TokenSink = Callable[[list[TokenOutput]], Awaitable[None]]


class EngineLoop:
    def __init__(self, engine: Engine, sink: TokenSink):
        self.engine = engine
        self._sink = sink
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._wake = asyncio.Event()
        self._stepping: asyncio.Task | None = None

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def start(self) -> None:
        self._stepping = asyncio.create_task(self._step_forever(), name="decode-steps")

    def wake(self) -> None:
        """Call after a sequence joined the running batch."""
        self._wake.set()

    async def _step_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.engine.num_running > 0:
                try:
                    outputs = await self.call(self.engine.step)
                except Exception:
                    log.exception("decode_step_failed")
                    raise
                await self._sink(outputs)

    async def stop(self) -> None:
        if self._stepping is not None:
            self._stepping.cancel()
            try:
                await self._stepping
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True, cancel_futures=True)
