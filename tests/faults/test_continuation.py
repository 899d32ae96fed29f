"""A migrated request's continuation on the real tiny-llama engine: prompt + tokens so far, step_offset.

Whatever was generated before the move is re-prefilled elsewhere; the continuation must
produce exactly the tokens an undisturbed run produces next, greedy and seeded alike.
"""

import dataclasses

import pytest
import torch

from shared.engine.engine import Engine
from shared.engine.loader import load_model
from shared.engine.sampling import SamplingParams

PROMPT = [1, 504, 3458, 314, 260, 1345, 30, 2, 198, 1, 520, 9531, 198, 77, 4093, 11, 28, 3060, 99, 1001]
GREEDY = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=30, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("tiny-llama")
    torch.set_num_threads(threads)


def generate(engine: Engine, request_id: str, prompt: list[int], sampling: SamplingParams) -> list[int]:
    tokens = [engine.prefill(request_id, prompt, sampling).token_id]
    while engine.num_running:
        tokens += [out.token_id for out in engine.step() if out.request_id == request_id]
    engine.free(request_id)
    return tokens


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("moved_after", [1, 13])
def test_a_continuation_produces_the_undisturbed_tokens(tiny, sampling, moved_after):
    undisturbed = generate(Engine(tiny, kv_cache_tokens=512), "r", PROMPT, sampling)
    forwarded = undisturbed[:moved_after]
    continuation = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - moved_after, step_offset=moved_after)
    rest = generate(Engine(tiny, kv_cache_tokens=512), "r-m1", PROMPT + forwarded, continuation)
    assert forwarded + rest == undisturbed


def test_without_the_offset_a_seeded_continuation_would_diverge(tiny):
    undisturbed = generate(Engine(tiny, kv_cache_tokens=512), "r", PROMPT, SEEDED)
    wrong = dataclasses.replace(SEEDED, max_tokens=SEEDED.max_tokens - 13)
    rest = generate(Engine(tiny, kv_cache_tokens=512), "r-m1", PROMPT + undisturbed[:13], wrong)
    assert rest != undisturbed[13:]  # the offset is what keeps the draws in step
