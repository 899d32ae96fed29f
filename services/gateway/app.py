"""The OpenAI-compatible HTTP front: /v1/chat/completions, /v1/completions, /v1/models,
/health (ready to serve: services/gateway/readiness.py) and /live (the process is up).

Tokenization and the chat template run here, so workers only ever see token ids.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass

import structlog
from aiohttp import web

from services.gateway.auth import OPEN_PATHS, ApiKeys
from services.gateway.completion import Completion
from services.gateway.dispatcher import Dispatcher
from services.gateway.json_body import MAX_BODY_BYTES, read_json
from services.gateway.logprobs import LogprobFormatter
from services.gateway.metrics import GatewayMetrics
from services.gateway.readiness import ReadinessProbe
from services.gateway.stop_strings import StopStrings
from services.gateway.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
)
from shared.engine.generation_defaults import NO_DEFAULTS, GenerationDefaults, choose_sampling
from shared.engine.tokenizer import ChatTokenizer
from shared.protocol import FinishReason, Sampling

log = structlog.get_logger()

PATH_HEADER = "x-pdserve-path"


RETRY_AFTER_S = 1
MAX_WIRE_INT = 2**63 - 1  # msgspec carries signed 64-bit ints; a bigger one could not be sent on


@dataclass(frozen=True)
class GatewayLimits:
    max_model_len: int
    default_max_tokens: int = 256
    max_concurrent_requests: int = 256
    vocab_size: int | None = None  # token ids a client sends must lie below it


def check_token_ids(ids: list[int], vocab_size: int | None, param: str) -> None:
    """Refuses ids the model has no embedding for, before any worker sees them."""
    if vocab_size is None:
        return
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise RequestError(400, f"token id {bad} is outside the vocabulary [0, {vocab_size})", param=param)


def _error_response(error: RequestError) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status in (429, 503) else None  # busy or unavailable: try again
    if error.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return web.json_response(error.body(), status=error.status, headers=headers)


@web.middleware
async def openai_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except RequestError as error:
        return _error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(RequestError(exc.status, exc.reason or "error"))
    except ConnectionResetError:
        raise  # the client went away mid-response: there is no one to answer
    except Exception:  # a bug must still answer in JSON, and be logged
        log.exception("request_failed", path=request.path)
        return _error_response(RequestError(500, "internal error while handling the request"))


def api_key_middleware(keys: ApiKeys):
    @web.middleware
    async def require_api_key(request: web.Request, handler):
        if request.path not in OPEN_PATHS:
            refusal = keys.refusal(request.headers.get("Authorization"))
            if refusal is not None:
                raise RequestError(401, refusal, code="invalid_api_key")
        return await handler(request)

    return require_api_key


class Gateway:
    def __init__(
        self,
        model_name: str,
        tokenizer: ChatTokenizer,
        dispatcher: Dispatcher,
        limits: GatewayLimits,
        api_keys: ApiKeys,
        readiness: ReadinessProbe,
        generation: GenerationDefaults = NO_DEFAULTS,
    ):
        self.model_name = model_name
        self.api_keys = api_keys
        self.readiness = readiness
        self.generation = generation  # the model's recommended sampling, for what a request leaves unset
        self.tokenizer = tokenizer
        self.dispatcher = dispatcher
        self.limits = limits
        self.metrics = GatewayMetrics()
        self.started = int(time.time())
        self.in_flight: set[str] = set()
        self.draining = False  # set on SIGTERM (shutdown.py): new requests and /health get 503
        self.logprob_formatter = LogprobFormatter(tokenizer)

    def app(self) -> web.Application:
        auth = [api_key_middleware(self.api_keys)] if self.api_keys.required else []
        app = web.Application(middlewares=[openai_errors, *auth], client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/live", self.live)
        app.router.add_get("/metrics", self.prometheus)
        return app

    async def prometheus(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def cancel(self, request_id: str) -> bool:
        """Ends a request: its client gets an error, its workers are told to stop."""
        return self.dispatcher.interrupt(request_id)

    async def health(self, _: web.Request) -> web.Response:
        if self.draining:  # shutting down: load balancers move away now, before the port closes
            return web.json_response({"status": "draining", "model": self.model_name}, status=503)
        report = await self.readiness.report()
        return web.json_response(report.body, status=report.status)

    async def live(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "model": self.model_name})

    async def models(self, _: web.Request) -> web.Response:
        card = {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "pdserve"}
        return web.json_response({"object": "list", "data": [card]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, ChatCompletionRequest)
        if not body.messages:
            raise RequestError(400, "messages must not be empty", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt_ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
        return await self._generate(request, body, prompt_ids, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, CompletionRequest)
        if isinstance(body.prompt, list):
            check_token_ids(body.prompt, self.limits.vocab_size, "prompt")
        prompt_ids = body.prompt if isinstance(body.prompt, list) else self.tokenizer.encode(body.prompt)
        if not prompt_ids:
            raise RequestError(400, "prompt must not be empty", param="prompt")
        return await self._generate(request, body, prompt_ids, chat=False)

    def _sampling(self, body, num_prompt_tokens: int) -> Sampling:
        if body.model != self.model_name:
            raise RequestError(400, f"model {body.model!r} is not served here; available: {self.model_name}", param="model")
        if body.n != 1:
            raise RequestError(400, "only n=1 is supported", param="n")
        room = self.limits.max_model_len - num_prompt_tokens
        if room <= 0:
            raise RequestError(400, f"prompt has {num_prompt_tokens} tokens; the model's context is {self.limits.max_model_len}", param="messages")
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:
            max_tokens = min(self.limits.default_max_tokens, room)
        if max_tokens <= 0:
            raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if max_tokens > room:
            raise RequestError(400, f"prompt ({num_prompt_tokens}) + max_tokens ({max_tokens}) exceeds the context of {self.limits.max_model_len}", param="max_tokens")
        chosen = choose_sampling(body.temperature, body.top_p, body.top_k, self.generation)
        if chosen.temperature < 0:
            raise RequestError(400, "temperature must be >= 0", param="temperature")
        if not 0 < chosen.top_p <= 1:
            raise RequestError(400, "top_p must be in (0, 1]", param="top_p")
        if chosen.top_k < 0:
            raise RequestError(400, "top_k must be >= 0", param="top_k")
        if chosen.top_k > MAX_WIRE_INT:
            raise RequestError(400, f"top_k must be at most {MAX_WIRE_INT}", param="top_k")
        if body.seed is not None and not 0 <= body.seed <= MAX_WIRE_INT:
            raise RequestError(400, f"seed must be between 0 and {MAX_WIRE_INT}", param="seed")
        check_token_ids(body.stop_token_ids, self.limits.vocab_size, "stop_token_ids")
        return Sampling(
            max_tokens=max_tokens,
            temperature=chosen.temperature,
            top_p=chosen.top_p,
            top_k=chosen.top_k,
            # Pinned here when sampling without one, so a migrated request keeps drawing from the same seed.
            seed=body.seed if body.seed is not None or chosen.temperature == 0 else secrets.randbits(63),
            ignore_eos=body.ignore_eos,
            stop_token_ids=list(body.stop_token_ids),
            logprobs=body.requested_logprobs(),
        )

    async def _generate(self, request: web.Request, body, prompt_ids: list[int], chat: bool) -> web.StreamResponse:
        arrived = time.monotonic()
        sampling = self._sampling(body, len(prompt_ids))
        stop_strings = StopStrings(body.stop_strings())
        if self.draining:
            self.metrics.rejected.labels(status="503").inc()
            raise RequestError(503, "the gateway is shutting down; retry on another instance")
        if len(self.in_flight) >= self.limits.max_concurrent_requests:
            self.metrics.rejected.labels(status="429").inc()
            raise RequestError(429, f"the gateway is at its limit of {self.limits.max_concurrent_requests} concurrent requests")
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        structlog.contextvars.bind_contextvars(request_id=request_id)
        self.in_flight.add(request_id)
        try:
            return await self._serve(request, body, prompt_ids, chat, sampling, stop_strings, request_id, arrived)
        finally:
            self.in_flight.discard(request_id)

    async def _serve(self, request, body, prompt_ids, chat, sampling, stop_strings, request_id, arrived) -> web.StreamResponse:
        try:
            dispatched = await self.dispatcher.dispatch(request_id, self.model_name, prompt_ids, sampling)
        except RequestError as error:
            self.metrics.rejected.labels(status=str(error.status)).inc()
            raise
        self.metrics.queue.observe(time.monotonic() - arrived)
        timing = TokenTiming(self.metrics, arrived)
        completion = Completion(
            request_id=request_id,
            model=self.model_name,
            chat=chat,
            placement=dispatched.placement,
            num_prompt_tokens=len(prompt_ids),
            tokenizer=self.tokenizer,
            hidden_token_ids=frozenset(self.tokenizer.eos_token_ids) | frozenset(sampling.stop_token_ids),
            return_token_ids=body.return_token_ids,
            stop_strings=stop_strings,
            logprobs=self.logprob_formatter if sampling.logprobs is not None else None,
        )
        headers = {PATH_HEADER: dispatched.placement.path.label}
        events = timing.track(dispatched.events)
        try:
            if body.stream:
                return await self._stream(request, completion, dispatched, events, body.include_usage, headers)
            async for event in events:
                completion.follow(dispatched)
                completion.absorb(event)
                if completion.stopped_by_string:
                    break  # closing the stream below cancels the request on its workers
            if completion.finish_reason is FinishReason.CANCELLED:
                raise RequestError(503, completion.error or "request cancelled")
            return web.json_response(completion.final(), headers=headers)
        finally:
            # Close explicitly: a client that went away must cancel its workers now,
            # not whenever the generators are garbage-collected.
            await events.aclose()
            await dispatched.events.aclose()
            completion.follow(dispatched)  # a request that failed after migrating counts its moves too
            self._count_finished(completion)

    def _count_finished(self, completion: Completion) -> None:
        reason = completion.finish_reason.label if completion.finish_reason else "cancelled"
        self.metrics.requests.labels(finish_reason=reason, path=completion.placement.path.label).inc()
        self.metrics.prompt_tokens.inc(completion.num_prompt_tokens)
        self.metrics.generation_tokens.inc(completion.num_generated)
        self.metrics.migrations.inc(completion.migrations)

    async def _stream(self, request, completion: Completion, dispatched, events, include_usage: bool, headers: dict) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
        await response.prepare(request)

        async def send(payload: dict) -> None:
            await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")

        first = True
        try:
            async for event in events:
                completion.follow(dispatched)
                delta = completion.absorb(event)
                if event.finish_reason is FinishReason.CANCELLED:
                    await send(RequestError(503, completion.error or "request cancelled").body())
                    break
                if delta or first or completion.return_token_ids:
                    await send(completion.chunk(delta, event.token_ids, first=first))
                    first = False
                if completion.finish_reason is not None:
                    await send(completion.chunk("", [], finish=True))
                    break
        except RequestError as error:
            await send(error.body())
        if include_usage and completion.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            await send(completion.usage_chunk())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class TokenTiming:
    """Observes TTFT, inter-token gaps and end-to-end latency as events stream through."""

    def __init__(self, metrics: GatewayMetrics, arrived: float):
        self.metrics = metrics
        self.arrived = arrived

    async def track(self, events):
        last = None
        async for event in events:
            now = time.monotonic()
            if event.token_ids:
                if last is None:
                    self.metrics.ttft.observe(now - self.arrived)
                else:
                    self.metrics.itl.observe(now - last)
                last = now
            if event.finish_reason is not None and event.finish_reason is not FinishReason.ERROR:
                self.metrics.e2e.observe(now - self.arrived)
            yield event
