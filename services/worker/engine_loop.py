"""The engine's home in a worker: one thread runs every engine call, in order, and a task steps it.

torch releases the GIL, so the asyncio loop keeps heartbeats, cancels and token
streams flowing while a forward pass runs. The stepping task runs `engine.step()` while
the engine has work (queued prompts, prompt chunks, decodes: continuous batching, one
forward pass each), hands every step's tokens to the sink, then sleeps until woken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from shared.engine.engine import Engine, StepError, TokenOutput

log = structlog.get_logger()

TokenSink = Callable[[list[TokenOutput]], Awaitable[None]]
FailureSink = Callable[[list[str], str], Awaitable[None]]  # (request ids, why): the engine already released them
StepObserver = Callable[[int, float], None]  # (prompt tokens the step ran, its seconds)

# Queued work whose pages are held elsewhere (a finished request not freed yet, a hand-off
# being placed) cannot start; with nothing running, look again after this long.
IDLE_POLL_S = 0.02
# While idle, the engine tells its other ranks it is alive this often (their waits for the
# next step are bounded by the group's timeout, which must stay well above this).
KEEPALIVE_S = 1.0


class EngineLoop:
    def __init__(self, engine: Engine, sink: TokenSink, on_failure: FailureSink, on_step: StepObserver = lambda *_: None):
        self.engine = engine
        self._sink = sink
        self._on_failure = on_failure
        self._on_step = on_step
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._wake = asyncio.Event()
        self._stepping: asyncio.Task | None = None

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def start(self) -> None:
        self._stepping = asyncio.create_task(self._step_forever(), name="engine-steps")

    def wake(self) -> None:
        """Call after work was queued on, or joined, the engine."""
        self._wake.set()

    async def _step_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), KEEPALIVE_S)
            except TimeoutError:
                try:
                    await self.call(self.engine.keepalive)
                except Exception as exc:  # the group broke: every request here must end
                    log.error("engine_keepalive_failed", error=repr(exc))
                    await self._on_failure([], f"rank group failed: {exc!r}")
                continue
            self._wake.clear()
            while self.engine.has_unfinished:
                started = time.perf_counter()
                try:
                    outputs = await self.call(self.engine.step)
                except StepError as exc:
                    log.exception("engine_step_failed", requests=len(exc.request_ids))
                    await self._on_failure(exc.request_ids, str(exc))
                    continue
                except Exception as exc:  # a bug outside the forward pass: keep serving, do not spin on it
                    log.exception("engine_step_crashed")
                    await self._on_failure([], f"engine step crashed: {exc!r}")
                    await asyncio.sleep(IDLE_POLL_S)
                    continue
                self._on_step(self.engine.last_step_prompt_tokens, time.perf_counter() - started)
                if outputs:
                    await self._sink(outputs)
                elif self.engine.num_running == 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
                    except TimeoutError:
                        pass
                    self._wake.clear()

    async def stop(self) -> None:
        if self._stepping is not None:
            self._stepping.cancel()
            try:
                await self._stepping
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True, cancel_futures=True)
