"""The walking skeleton end to end on tiny-llama: real nats-server, real UCX, real HTTP."""

import asyncio
import json

import aiohttp
import nats
import openai
import pytest

from shared.nats_server import EmbeddedNats
from tests.stack import start_stack, stop_stack_group

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about paged attention."}], "temperature": 0}


@pytest.fixture(scope="module")
def stack():
    # An open nats-server of our own (`--nats URL`): the wiretap test below reads every
    # subject, which no user of `pdserve up`'s secured embedded server may.
    with EmbeddedNats() as server:
        running = start_stack("--model", MODEL, "--nats", server.url)
        yield running
        assert stop_stack_group(running.proc), "pdserve up left processes behind"


async def post(url: str, body, raw: bool = False) -> tuple[int, dict | str, dict]:
    async with aiohttp.ClientSession() as session:
        data = body if raw else json.dumps(body)
        async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as response:
            text = await response.text()
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                payload = text
            return response.status, payload, dict(response.headers)


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


async def test_models_and_health(stack):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{stack.base_url}/models") as response:
            models = await response.json()
        async with session.get(f"{stack.root_url}/health") as response:
            assert response.status == 200  # `pdserve up` printed its ready line only once it was
            health = await response.json()
        async with session.get(f"{stack.root_url}/live") as response:
            assert response.status == 200
    assert health["status"] == "ready" and health["workers"] == {"prefill": 1, "decode": 1, "both": 0}
    assert [m["id"] for m in models["data"]] == [MODEL]


async def test_chat_stream_format_and_usage(stack):
    body = CHAT | {"max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    status, text, headers = await post(f"{stack.base_url}/chat/completions", body)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["x-pdserve-path"] == "disagg"
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length" and set(finish[:-1]) == {None}
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert usage["pdserve"]["path"] == "disagg"


async def test_non_stream_chat_and_completion_agree_with_stream(stack):
    body = CHAT | {"max_tokens": 10, "return_token_ids": True, "ignore_eos": True}
    status, whole, _ = await post(f"{stack.base_url}/chat/completions", body)
    assert status == 200
    status, text, _ = await post(f"{stack.base_url}/chat/completions", body | {"stream": True})
    streamed_ids = [i for e in sse_events(text)[:-1] for c in json.loads(e)["choices"] for i in c.get("token_ids", [])]
    streamed_text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in sse_events(text)[:-1])
    assert whole["choices"][0]["token_ids"] == streamed_ids
    assert whole["choices"][0]["message"]["content"] == streamed_text
    assert len(streamed_ids) == 10

    status, completion, _ = await post(f"{stack.base_url}/completions", {"model": MODEL, "prompt": "Once upon", "max_tokens": 5, "temperature": 0})
    assert status == 200
    assert completion["object"] == "text_completion"
    assert completion["usage"]["completion_tokens"] <= 5


async def test_openai_client_streams_with_usage(stack):
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused")
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=CHAT["messages"],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    await client.close()
    assert usage is not None and usage.completion_tokens == 8
    assert "".join(pieces)


async def test_kv_crosses_ucx_and_nats_messages_stay_small(stack):
    nc = await nats.connect(stack.nats_url)
    sizes: list[int] = []

    async def record(msg):
        sizes.append(len(msg.data))

    await nc.subscribe(">", cb=record)
    await nc.flush()
    body = CHAT | {"max_tokens": 6, "ignore_eos": True, "messages": [{"role": "user", "content": "word " * 300}]}
    status, reply, _ = await post(f"{stack.base_url}/chat/completions", body)
    await asyncio.sleep(0.3)
    await nc.close()
    assert status == 200
    extension = reply["usage"]["pdserve"]
    # tiny-llama: 2 layers x (K,V) x prompt tokens x 2 kv heads x head_dim 16 x 4 bytes
    expected = 2 * 2 * reply["usage"]["prompt_tokens"] * 2 * 16 * 4
    assert extension["kv_transfer_bytes"] == expected
    assert extension["kv_transfer_messages"] == 1
    assert max(sizes) < 64 * 1024
    assert expected > max(sizes)  # the KV itself could not have gone over NATS


@pytest.mark.parametrize(
    "body, raw, param",
    [
        ("{not json", True, None),
        ({"model": MODEL}, False, None),
        ({"messages": [{"role": "user", "content": "hi"}]}, False, None),
        (CHAT | {"max_tokens": 0}, False, "max_tokens"),
        (CHAT | {"max_tokens": -5}, False, "max_tokens"),
        (CHAT | {"model": "gpt-17"}, False, "model"),
    ],
)
async def test_bad_input_is_a_400_with_openai_error(stack, body, raw, param):
    status, reply, _ = await post(f"{stack.base_url}/chat/completions", body, raw=raw)
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["message"]
    assert reply["error"]["param"] == param


async def test_stack_still_serves_after_bad_input(stack):
    status, reply, _ = await post(f"{stack.base_url}/chat/completions", CHAT | {"max_tokens": 3})
    assert status == 200
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


def test_cli_rejects_bad_flag_by_name():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "services.cli", "up", "--mode", "sideways"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--mode" in result.stderr
    result = subprocess.run([sys.executable, "-m", "services.cli", "up", "--port", "eighty"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--port" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--max-num-batched-tokens", "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "--max-num-batched-tokens" in result.stderr




async def test_stop_string_ends_the_request_early(stack):
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    _, free_run, _ = await post(f"{stack.base_url}/completions", body)
    text = free_run["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    status, stopped, _ = await post(f"{stack.base_url}/completions", body | {"stop": [stop], "stream": True})
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in sse_events(stopped)[:-1] if json.loads(e)["choices"])
    reasons = [json.loads(e)["choices"][0]["finish_reason"] for e in sse_events(stopped)[:-1] if json.loads(e)["choices"]]
    assert status == 200
    assert streamed == text[: text.index(stop)]
    assert reasons[-1] == "stop"


def engine_logprobs(prompt_ids: list[int], max_tokens: int, top: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """The same greedy request run in-process on one engine: (token, logprob, top) per generated token."""
    from shared.engine.engine import Engine
    from shared.engine.loader import load_model
    from shared.engine.sampling import SamplingParams

    engine = Engine(load_model(MODEL), kv_cache_tokens=4096)
    engine.add_request("r", prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=top))
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    return [(o.token_id, o.logprob, o.top_logprobs) for o in outputs]


async def test_logprobs_match_the_engine_across_the_hand_off(stack):
    body = CHAT | {"max_tokens": 6, "ignore_eos": True, "logprobs": True, "top_logprobs": 3, "return_token_ids": True}
    status, reply, _ = await post(f"{stack.base_url}/chat/completions", body)
    assert status == 200, reply
    choice = reply["choices"][0]
    content = choice["logprobs"]["content"]
    assert reply["usage"]["pdserve"]["path"] == "disagg"  # token 1 from the prefill worker, the rest from the decoder
    assert len(content) == len(choice["token_ids"]) == 6

    from shared.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": CHAT["messages"][0]["content"]}]))
    expected = engine_logprobs(prompt_ids, 6, 3)
    assert [token for token, _, _ in expected] == choice["token_ids"]
    for entry, (token, logprob, top) in zip(content, expected):
        assert entry["logprob"] == pytest.approx(logprob, abs=1e-4)
        assert bytes(entry["bytes"]) == tokenizer.token_bytes(token)
        assert [bytes(t["bytes"]) for t in entry["top_logprobs"]] == [tokenizer.token_bytes(i) for i, _ in top]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([lp for _, lp in top], abs=1e-4)
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])  # greedy: the most likely

    status, text, _ = await post(f"{stack.base_url}/chat/completions", body | {"stream": True})
    streamed = [e for event in sse_events(text)[:-1] for c in json.loads(event)["choices"] if c["logprobs"] for e in c["logprobs"]["content"]]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-6)


async def test_completion_logprobs_legacy_shape(stack):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    status, reply, _ = await post(f"{stack.base_url}/completions", body)
    assert status == 200, reply
    logprobs = reply["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 5
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(lp) for top, lp in zip(logprobs["top_logprobs"], logprobs["token_logprobs"]))
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], logprobs["tokens"]))
    status, plain, _ = await post(f"{stack.base_url}/completions", body | {"logprobs": None})
    assert plain["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("chat/completions", {"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
    ],
)
async def test_bad_logprobs_are_a_400_naming_the_field(stack, path, extra, param):
    base = CHAT if path.startswith("chat") else {"model": MODEL, "prompt": "hi"}
    status, reply, _ = await post(f"{stack.base_url}/{path}", base | extra)
    assert status == 400
    assert reply["error"]["param"] == param
