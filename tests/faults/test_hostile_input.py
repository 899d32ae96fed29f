"""Hostile bodies at a real gateway: each gets the right 4xx with an OpenAI-style JSON body.

Refusals happen before any dispatch, so the gateway runs alone on a real nats-server (no
scheduler): a body that passes every check gets the 503 "no scheduler", which shows the
checks let it through.
"""

import json
import subprocess
import sys

import aiohttp
import msgspec
import pytest

from services.gateway.json_body import MAX_BODY_BYTES, MAX_JSON_DEPTH, json_depth
from services.gateway.openai_schema import ChatCompletionRequest, RequestError, parse_body
from shared import processes
from shared.engine.loader import load_model_config
from shared.nats_server import EmbeddedNats

MODEL = "tiny-llama"
KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
DEEP = "[" * 10_000 + "]" * 10_000


@pytest.fixture(scope="module")
def gateway():
    port = processes.free_port()
    with EmbeddedNats() as server:
        argv = ["gateway", "--nats", server.url, "--model", MODEL, "--port", str(port), "--api-key", KEY]
        proc = processes.spawn([sys.executable, "-m", "services.cli", *argv], stdout=subprocess.DEVNULL)
        try:
            processes.wait_for_port("127.0.0.1", port, timeout=60, proc=proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            processes.stop([proc])


async def post(url: str, data: bytes, headers: dict) -> tuple[int, str, dict]:
    async with aiohttp.ClientSession() as session:
        skip = () if "Content-Type" in headers else ("Content-Type",)  # else aiohttp adds octet-stream
        async with session.post(url, data=data, headers=headers, skip_auto_headers=skip) as response:
            return response.status, response.content_type, json.loads(await response.text())


def body(**fields) -> bytes:
    return json.dumps(CHAT | fields).encode()


def completion(**fields) -> bytes:
    return json.dumps({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4} | fields).encode()


VOCAB = load_model_config(MODEL).vocab_size
CHAT_CASES = {
    "nested 10,000 deep": (DEEP.encode(), JSON, 400, None),
    "nested 10,000 deep in an unknown field": (b'{"model": "m", "x": ' + DEEP.encode() + b', "messages": []}', JSON, 400, None),
    "invalid UTF-8": (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\xff\xfe"}]}', JSON, 400, None),
    "not JSON at all": (b"\x00\x01{", JSON, 400, None),
    "content: null": (body(messages=[{"role": "user", "content": None}]), JSON, 400, "messages[0].content"),
    "message without content": (body(messages=[{"role": "user"}]), JSON, 400, "messages[0]"),
    "text/plain": (body(), {"Content-Type": "text/plain"}, 415, None),
    "form encoded (curl -d without -H)": (body(), {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    "octet-stream": (body(), {"Content-Type": "application/octet-stream"}, 415, None),
    "larger than the limit": (body(messages=[{"role": "user", "content": "a" * MAX_BODY_BYTES}]), JSON, 413, None),
    "stop token id past the vocabulary": (body(stop_token_ids=[VOCAB]), JSON, 400, "stop_token_ids"),
    "seed past 64 bits": (body(seed=2**70), JSON, 400, "seed"),
    "top_k past 64 bits": (body(top_k=10**30), JSON, 400, "top_k"),
}
COMPLETION_CASES = {
    "prompt id past the vocabulary": (completion(prompt=[1, VOCAB]), "prompt"),
    "negative prompt id": (completion(prompt=[1, -5]), "prompt"),
    "prompt id past 64 bits": (completion(prompt=[10**30]), "prompt"),
    "stop token id negative": (completion(stop_token_ids=[-1]), "stop_token_ids"),
}


@pytest.mark.parametrize("case", CHAT_CASES)
async def test_hostile_chat_body_gets_a_json_4xx(gateway, case):
    data, headers, expected_status, param = CHAT_CASES[case]
    status, content_type, reply = await post(f"{gateway}/v1/chat/completions", data, headers | AUTH)
    assert (status, content_type) == (expected_status, "application/json")
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]
    assert reply["error"]["param"] == param


@pytest.mark.parametrize("case", COMPLETION_CASES)
async def test_token_ids_are_checked_against_the_vocabulary(gateway, case):
    data, param = COMPLETION_CASES[case]
    status, content_type, reply = await post(f"{gateway}/v1/completions", data, JSON | AUTH)
    assert (status, content_type, reply["error"]["param"]) == (400, "application/json", param)


async def test_valid_bodies_pass_every_check(gateway):
    """The edges of the allowed: the last vocabulary id, no Content-Type header at all."""
    for url, data, headers in (
        (f"{gateway}/v1/completions", completion(prompt=[0, VOCAB - 1], stop_token_ids=[VOCAB - 1], seed=2**63 - 1), JSON),
        (f"{gateway}/v1/chat/completions", body(), {}),
        (f"{gateway}/v1/chat/completions", body(messages=[{"role": "user", "content": [{"type": "text", "text": "[[{{"}]}]), JSON),
    ):
        status, _, reply = await post(url, data, headers | AUTH)
        assert status == 503 and "scheduler" in reply["error"]["message"], reply


def test_json_depth_counts_brackets_outside_strings():
    assert json_depth(b'{"a": [1, {"b": []}]}') == 4
    assert json_depth(b'{"a": "[[[[{{{{", "b": "\\"[[["}') == 1
    assert json_depth(DEEP.encode()) == 10_000
    assert json_depth(b"42") == 0
    assert MAX_JSON_DEPTH < 10_000


def test_parse_body_maps_every_decoder_failure_to_a_400():
    for raw in (b"\xff", b'{"model": "\xff"}', b"[" * 5000, b'{"model": 1}'):
        with pytest.raises(RequestError) as caught:
            parse_body(raw, ChatCompletionRequest)
        assert caught.value.status == 400
    with pytest.raises(RequestError) as caught:
        parse_body(b'{"model": "m", "messages": [{"role": "user", "content": null}]}', ChatCompletionRequest)
    assert caught.value.param == "messages[0].content"
    assert isinstance(parse_body(json.dumps(CHAT).encode(), ChatCompletionRequest), msgspec.Struct)
