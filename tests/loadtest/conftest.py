"""A fake OpenAI-compatible streaming server (aiohttp, own thread) and a fake tokenizer."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web


class CharTokenizer:
    """One token per character: exact, trivial, and enough to test prompt lengths."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


@dataclass
class FakeOpenAI:
    """Streams max_tokens chunks of one token each. Every `fail_every`-th request misbehaves as `failure`:
    status (HTTP 500), drop (connection closed mid-stream), eof (stream ends without [DONE]),
    error-event (an error chunk, then [DONE]), hang (stops sending; only a client timeout ends it)."""

    failure: str = "status"
    fail_every: int = 0
    first_token_delay: float = 0.01
    token_delay: float = 0.002
    bodies: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        return app

    def _chunk(self, chat: bool, text: str, finish: str | None = None) -> dict:
        if chat:
            return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
        return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        failing = self.fail_every > 0 and len(self.bodies) % self.fail_every == 0
        if failing and self.failure == "status":
            return web.json_response({"error": {"message": "boom", "code": 500}}, status=500)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._stream(request, body, failing)
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, body: dict, failing: bool) -> web.StreamResponse:
        chat = "messages" in body
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(payload) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await response.write(f"data: {data}\n\n".encode())

        if chat:  # like vLLM: a role-only chunk before any token
            await send({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        await asyncio.sleep(self.first_token_delay)
        for i in range(body["max_tokens"]):
            if failing and i == 2:
                return await self._misbehave(request, response, send)
            await send(self._chunk(chat, f" t{i}"))
            await asyncio.sleep(self.token_delay)
        await send(self._chunk(chat, "", finish="length"))
        prompt_tokens = len(body["prompt"]) if "prompt" in body else len(body["messages"][0]["content"]) + 3
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": body["max_tokens"], "total_tokens": prompt_tokens + body["max_tokens"]}
        await send({"object": "text_completion", "choices": [], "usage": usage})
        await send("[DONE]")
        await response.write_eof()
        return response

    async def _misbehave(self, request, response, send) -> web.StreamResponse:
        if self.failure == "drop":
            request.transport.close()
        elif self.failure == "eof":
            await response.write_eof()
        elif self.failure == "error-event":
            await send({"error": {"message": "generation failed", "code": 500}})
            await send("[DONE]")
            await response.write_eof()
        elif self.failure == "hang":
            await asyncio.sleep(3600)
        return response


@contextmanager
def serving(fake: FakeOpenAI) -> Iterator[str]:
    """Runs the fake on 127.0.0.1 in a thread with its own event loop; yields its /v1 URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(fake.app(), shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def fake_server():
    """`start(**FakeOpenAI fields) -> (fake, base_url)`; every server started is stopped after the test."""
    with ExitStack() as stack:

        def start(**kwargs) -> tuple[FakeOpenAI, str]:
            fake = FakeOpenAI(**kwargs)
            return fake, stack.enter_context(serving(fake))

        yield start
