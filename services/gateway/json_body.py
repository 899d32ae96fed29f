"""Reading a request body that may be hostile: type, size, nesting, then schema.

Every refusal is an OpenAI-style 4xx (never a 500, never text/plain):
415 for a body that is not JSON, 413 past MAX_BODY_BYTES (aiohttp's `client_max_size`),
400 for JSON nested deeper than MAX_JSON_DEPTH, invalid UTF-8, or a schema mismatch.
The depth is checked before decoding because the decoder recurses once per level; the
check scans only brackets outside strings, in C (re) and numpy, so a 4 MiB body of
brackets costs milliseconds.
"""

from __future__ import annotations

import re

import msgspec
import numpy as np
from aiohttp import web

from services.gateway.openai_schema import RequestError, parse_body

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 32  # our bodies need 5 (body > messages > message > content > part)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of `raw` nest (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", raw))
    if not brackets:
        return 0
    return int(np.cumsum(_STEP[np.frombuffer(brackets, dtype=np.uint8)], dtype=np.int64).max())


def _is_json(request: web.Request) -> bool:
    """Clients that send no Content-Type at all are let through; any other type is refused."""
    if "Content-Type" not in request.headers:
        return True
    return request.content_type == "application/json" or request.content_type.endswith("+json")


async def read_json(request: web.Request, kind: type[msgspec.Struct]) -> msgspec.Struct:
    if not _is_json(request):
        raise RequestError(415, f"Content-Type must be application/json, got {request.content_type!r}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(413, f"the request body is larger than the limit of {MAX_BODY_BYTES} bytes") from None
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise RequestError(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    return parse_body(raw, kind)
