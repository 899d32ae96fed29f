"""The worker's engine loop on a real tiny engine: queued prompts share forward passes, failures reach the sink."""

import asyncio

import pytest

from services.worker.engine_loop import EngineLoop
from shared.engine.engine import Engine, SchedulingConfig
from shared.engine.loader import load_model
from shared.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


class Recorder:
    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.finished: set[str] = set()
        self.failed: dict[str, str] = {}
        self.step_prompt_tokens: list[int] = []
        self.done = asyncio.Event()
        self.expected = 0

    async def sink(self, outputs):
        for out in outputs:
            self.tokens.setdefault(out.request_id, []).append(out.token_id)
            if out.finish_reason is not None:
                self.finished.add(out.request_id)
        self._check_done()

    async def on_failure(self, request_ids, error):
        self.failed.update(dict.fromkeys(request_ids, error))
        self._check_done()

    def on_step(self, prompt_tokens, seconds):
        assert seconds >= 0
        self.step_prompt_tokens.append(prompt_tokens)

    def _check_done(self):
        if len(self.finished) + len(self.failed) >= self.expected:
            self.done.set()


async def run_until_done(loop: EngineLoop, recorder: Recorder, expected: int) -> None:
    recorder.expected = expected
    loop.start()
    loop.wake()
    try:
        await asyncio.wait_for(recorder.done.wait(), 60)
    finally:
        await loop.stop()


async def test_queued_prompts_share_steps_within_the_token_budget(tiny):
    engine = Engine(tiny, kv_cache_tokens=2048, scheduling=SchedulingConfig(max_num_batched_tokens=64))
    recorder = Recorder()
    loop = EngineLoop(engine, recorder.sink, recorder.on_failure, recorder.on_step)
    prompts = {f"r{n}": list(range(1, n + 1)) for n in (10, 20, 30, 40)}
    for request_id, ids in prompts.items():
        engine.add_request(request_id, ids, GREEDY)
    await run_until_done(loop, recorder, len(prompts))

    assert recorder.finished == set(prompts) and not recorder.failed
    assert all(len(tokens) == GREEDY.max_tokens for tokens in recorder.tokens.values())
    prompt_steps = [n for n in recorder.step_prompt_tokens if n]
    assert sum(prompt_steps) == sum(len(ids) for ids in prompts.values())
    assert max(prompt_steps) == 64  # one pass took several prompts (and a chunk of the next), up to the budget
    assert len(prompt_steps) == 2  # 100 prompt tokens under a 64-token budget
    for request_id in prompts:  # finished requests keep their pages until the worker frees them
        engine.free(request_id)
    assert engine.num_free_blocks == engine.num_blocks


async def test_a_failed_step_reaches_the_failure_sink_and_the_loop_goes_on(tiny):
    engine = Engine(tiny, kv_cache_tokens=2048)
    recorder = Recorder()
    loop = EngineLoop(engine, recorder.sink, recorder.on_failure, recorder.on_step)
    forward = engine.runner.model  # every rank's forward runs through its step runner
    calls = 0

    def failing_once(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("simulated kernel fault")
        return forward(*args)

    engine.runner.model = failing_once
    engine.add_request("doomed", [1, 2, 3], GREEDY)
    await run_until_done(loop, recorder, 1)
    assert "doomed" in recorder.failed and "simulated kernel fault" in recorder.failed["doomed"]
    assert engine.num_free_blocks == engine.num_blocks  # the engine released it

    recorder = Recorder()
    loop = EngineLoop(engine, recorder.sink, recorder.on_failure, recorder.on_step)
    engine.add_request("after", [1, 2, 3], GREEDY)
    await run_until_done(loop, recorder, 1)
    assert recorder.finished == {"after"} and not recorder.failed
