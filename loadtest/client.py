"""One streaming request to an OpenAI-compatible server, timed token by token.

Life of a request: POST with `stream: true` → wait for the HTTP status → read SSE lines
(`data: {...}`) → stamp each chunk that carries generated text → `data: [DONE]`.

Timing follows `vllm bench serve`: TTFT is the time to the first chunk with generated
output; every later such chunk adds one inter-token gap (a chunk that carries several
tokens adds one gap, and the token count comes from `usage.completion_tokens`).

A request fails — never hangs — when: the status is not 200; the connection breaks or the
stream ends before `data: [DONE]`; a chunk carries an `error`; no token arrives; or the
whole request takes longer than the per-request timeout.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from dataclasses import dataclass, field

import aiohttp

from loadtest.schedule import RequestSpec

_ERROR_BODY_CHARS = 300


class Endpoint(enum.Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"

    @property
    def path(self) -> str:
        return "/completions" if self is Endpoint.COMPLETIONS else "/chat/completions"


@dataclass(frozen=True)
class Target:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    endpoint: Endpoint = Endpoint.COMPLETIONS
    timeout_s: float = 300.0
    temperature: float = 0.0
    ignore_eos: bool = True  # extension (vLLM, pdserve): generate exactly max_tokens
    api_key: str | None = None  # sent as Authorization: Bearer, as OpenAI clients do

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"request timeout must be > 0, got {self.timeout_s}")

    @property
    def url(self) -> str:
        return normalize_base_url(self.base_url) + self.endpoint.path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, spec: RequestSpec) -> dict:
        body = {
            "model": self.model,
            "max_tokens": spec.output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.endpoint is Endpoint.CHAT:
            return body | {"messages": [{"role": "user", "content": spec.prompt}]}
        return body | {"prompt": spec.prompt}


def normalize_base_url(url: str) -> str:
    """`http://host:port`, `.../v1` and `.../v1/` all become `.../v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class RequestOutcome:
    index: int
    start_s: float  # send time, seconds after the benchmark started
    input_len: int  # server-reported prompt_tokens if given, else the spec's length
    requested_output_len: int
    output_len: int = 0
    ttft_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    e2el_s: float = 0.0
    error: str = ""  # empty on success

    @property
    def success(self) -> bool:
        return not self.error

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than 2 tokens."""
        if not self.success or self.output_len < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_len - 1)


class _StreamFailed(Exception):
    pass


def _generated_text(chunk: dict) -> str | None:
    """The chunk's generated text, or None when it carries no token (role-only, usage-only)."""
    choices = chunk.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    if choice.get("token_ids"):
        return choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or None
    text = choice.get("text")
    if text:
        return text
    return "" if choice.get("finish_reason") is None else None  # a held-back partial character


class _Recorder:
    """Collects the timing of one stream as its chunks arrive."""

    def __init__(self, outcome: RequestOutcome, sent: float):
        self.outcome = outcome
        self._sent = sent
        self._last: float | None = None
        self.num_token_chunks = 0
        self.done = False

    def on_data(self, data: str, now: float) -> None:
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise _StreamFailed(f"malformed SSE data: {data[:_ERROR_BODY_CHARS]!r}") from None
        if "error" in chunk:
            raise _StreamFailed(f"server error in stream: {json.dumps(chunk['error'])[:_ERROR_BODY_CHARS]}")
        usage = chunk.get("usage")
        if usage:
            self.outcome.output_len = int(usage.get("completion_tokens") or 0)
            self.outcome.input_len = int(usage.get("prompt_tokens") or self.outcome.input_len)
        if _generated_text(chunk) is None:
            return
        if self._last is None:
            self.outcome.ttft_s = now - self._sent
        else:
            self.outcome.itls_s.append(now - self._last)
        self._last = now
        self.num_token_chunks += 1


async def send(session: aiohttp.ClientSession, target: Target, spec: RequestSpec, bench_start: float) -> RequestOutcome:
    """Sends one request and returns its outcome; never raises except on cancellation."""
    sent = time.perf_counter()
    outcome = RequestOutcome(spec.index, sent - bench_start, spec.input_len, spec.output_len)
    recorder = _Recorder(outcome, sent)
    try:
        async with asyncio.timeout(target.timeout_s):
            await _stream(session, target, spec, recorder)
        if not recorder.done:
            raise _StreamFailed("stream ended before data: [DONE]")
        if recorder.num_token_chunks == 0:
            raise _StreamFailed("no tokens received")
    except TimeoutError:
        outcome.error = f"timed out after {target.timeout_s:g}s"
    except _StreamFailed as exc:
        outcome.error = str(exc)
    except (aiohttp.ClientError, OSError, ValueError) as exc:  # broken connection, oversized line, ...
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.e2el_s = time.perf_counter() - sent
    if outcome.success and outcome.output_len == 0:
        outcome.output_len = recorder.num_token_chunks  # the server sent no usage
    if not outcome.success:
        outcome.output_len = 0
    return outcome


async def _stream(session: aiohttp.ClientSession, target: Target, spec: RequestSpec, recorder: _Recorder) -> None:
    async with session.post(target.url, json=target.body(spec), headers=target.headers) as response:
        if response.status != 200:
            text = (await response.text())[:_ERROR_BODY_CHARS]
            raise _StreamFailed(f"HTTP {response.status}: {text}")
        async for raw in response.content:
            line = raw.decode("utf-8", errors="replace").strip()
            if line.startswith("data:"):
                recorder.on_data(line.removeprefix("data:").lstrip(), time.perf_counter())
                if recorder.done:
                    return
