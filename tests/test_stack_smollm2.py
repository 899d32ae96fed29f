"""Correctness through the real stack: SmolLM2 greedy tokens equal HF transformers' (the
oracle, loading the same GGUF) and equal the colocated path, token for token."""

import json

import aiohttp
import pytest

from shared.engine.tokenizer import load_tokenizer
from tests.oracle import hf_greedy_tokens
from tests.stack import start_stack, stop_stack_group

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
NUM_TOKENS = 32
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
]


@pytest.fixture(scope="module")
def stacks():
    disagg = start_stack("--model", MODEL)
    colocated = None
    try:
        colocated = start_stack("--model", MODEL, "--mode", "colocated")
        yield {"disagg": disagg, "colocated": colocated}
    finally:
        clean = [stop_stack_group(s.proc) for s in (disagg, colocated) if s is not None]
    assert all(clean), "pdserve up left processes behind"


async def greedy_ids(base_url: str, prompt: str) -> tuple[list[int], dict]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": NUM_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    ids, usage = [], None
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/chat/completions", json=body) as response:
            assert response.status == 200
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                for choice in chunk["choices"]:
                    ids.extend(choice.get("token_ids", []))
                usage = chunk.get("usage") or usage
    return ids, usage


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_greedy_matches_transformers_and_colocated(stacks, prompt):
    tokenizer = load_tokenizer(MODEL)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    disagg_ids, disagg_usage = await greedy_ids(stacks["disagg"].base_url, prompt)
    colocated_ids, colocated_usage = await greedy_ids(stacks["colocated"].base_url, prompt)
    assert disagg_usage["prompt_tokens"] == len(prompt_ids)
    assert disagg_usage["pdserve"]["path"] == "disagg"
    assert disagg_usage["pdserve"]["kv_transfer_bytes"] > 0
    assert colocated_usage["pdserve"]["path"] == "colocated"
    expected = hf_greedy_tokens(prompt_ids, NUM_TOKENS)
    assert disagg_ids == expected
    assert colocated_ids == expected


async def test_readme_request_answers_sensibly_with_the_models_defaults(stacks):
    """The README's first curl sets no temperature: the model's defaults apply (greedy), not OpenAI's 1.0."""
    body = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{stacks['disagg'].base_url}/chat/completions", json=body) as response:
            answer = (await response.json())["choices"][0]["message"]["content"]
    assert answer == "The capital of France is Paris."
