"""OpenAI-compatible request bodies, validated by msgspec, and OpenAI-style errors."""

from __future__ import annotations

import msgspec

from shared.engine.sampling import MAX_LOGPROBS

class ContentPart(msgspec.Struct):
    type: str
    text: str = ""


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart]  # null is refused: without tool calls a message needs text

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if part.type == "text")
        return self.content


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    # None: unset, so the model's recommended value applies (shared/engine/generation_defaults.py)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    stop: str | list[str] | None = None
    return_token_ids: bool = False  # extension (as in vLLM): generated ids in each choice

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise RequestError(400, "stop takes up to 4 non-empty strings", param="stop")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the k most likely."""
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise RequestError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
            _check_top(self.top_logprobs, "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[int]
    logprobs: int | None = None  # the legacy API: the k most likely alternatives per token

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        if self.logprobs is not None:
            _check_top(self.logprobs, "logprobs")
        return self.logprobs


def _check_top(value: int, param: str) -> None:
    if not 0 <= value <= MAX_LOGPROBS:
        raise RequestError(400, f"{param} must be between 0 and {MAX_LOGPROBS}, got {value}", param=param)


class RequestError(Exception):
    """Becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or _KIND_BY_STATUS.get(status) or ("invalid_request_error" if status < 500 else "server_error")
        self.code = code  # OpenAI's machine-readable code (e.g. invalid_api_key); else the status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code or self.status}}


_KIND_BY_STATUS = {
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def parse_body(raw: bytes, kind: type[msgspec.Struct]) -> msgspec.Struct:
    """Decodes a JSON body into `kind`; anything wrong with it is a 400 naming where."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise RequestError(400, f"invalid request: {exc}", param=_error_path(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise RequestError(400, f"malformed JSON body: {exc}") from None
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not valid UTF-8") from None
    except RecursionError:  # the depth check (json_body.py) normally refuses these first
        raise RequestError(400, "the JSON body is nested too deeply") from None


def _error_path(message: str) -> str | None:
    """`... - at `$.messages[0].content`` -> `messages[0].content` (OpenAI's `param`)."""
    _, found, path = message.rpartition(" - at `$")
    return path.rstrip("`").lstrip(".") or None if found else None
