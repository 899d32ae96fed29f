"""Continuous batching in the engine: add_request + step(), chunked prefill, cancellation, logprobs, hand-off."""

import dataclasses
import random

import pytest
import torch

from shared.engine.batch import ForwardBatch, SequenceChunk
from shared.engine.engine import Engine, KvCapacityError, QueueFullError, SchedulingConfig, StepError
from shared.engine.kv_cache import PagedKVCache
from shared.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=11, max_tokens=12, ignore_eos=True)


def prompt(length: int, seed: int, vocab: int = 49152) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def drive(engine: Engine, arrivals: dict[int, list[tuple]] | None = None, max_steps: int = 1000) -> dict[str, list[int]]:
    """Steps until idle, adding `arrivals[step]` = [(id, prompt, sampling)] before that step; frees finished requests."""
    arrivals = arrivals or {}
    tokens: dict[str, list[int]] = {}
    for step in range(max_steps):
        for request_id, ids, sampling in arrivals.get(step, []):
            engine.add_request(request_id, ids, sampling)
        if not engine.has_unfinished and step > max(arrivals, default=0):
            return tokens
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token_id)
            if out.finish_reason is not None:
                engine.free(out.request_id)
    raise AssertionError("the engine did not go idle")


def alone(loaded, request_id, ids, sampling, **engine_args) -> list[int]:
    engine = Engine(loaded, kv_cache_tokens=2048, **engine_args)
    return drive(engine, {0: [(request_id, ids, sampling)]})[request_id]


def test_sixteen_concurrent_requests_match_each_alone(tiny):
    lengths = [1, 3, 5, 8, 13, 16, 17, 21, 30, 31, 33, 40, 47, 50, 64, 70]  # across page boundaries (16)
    requests = [(f"r{i}", prompt(n, seed=i), dataclasses.replace(GREEDY, max_tokens=4 + i)) for i, n in enumerate(lengths)]
    expected = {rid: alone(tiny, rid, ids, sampling) for rid, ids, sampling in requests}
    # Staggered arrivals: requests join a running batch and others leave it at token boundaries.
    arrivals = {step: requests[2 * step : 2 * step + 2] for step in range(8)}
    engine = Engine(tiny, kv_cache_tokens=4096, scheduling=SchedulingConfig(max_num_batched_tokens=64))
    got = drive(engine, arrivals)
    assert got == expected
    assert all(len(got[rid]) == sampling.max_tokens for rid, _, sampling in requests)
    assert engine.num_free_blocks == engine.num_blocks


def test_several_prompts_share_one_forward_and_steps_mix_prefill_with_decode(tiny):
    engine = Engine(tiny, kv_cache_tokens=2048, scheduling=SchedulingConfig(max_num_batched_tokens=40))
    seen: list[list[int]] = []
    forward = engine.model.forward

    def recording_forward(input_ids, batch, kv_cache):
        seen.append(batch.num_new)
        return forward(input_ids, batch, kv_cache)

    engine.model.forward = recording_forward
    try:
        for i in range(3):
            engine.add_request(f"p{i}", prompt(10, seed=i), GREEDY)
        assert {out.request_id for out in engine.step()} == {"p0", "p1", "p2"}  # three prompts, one pass
        engine.add_request("long", prompt(50, seed=9), GREEDY)
        outs = engine.step()
    finally:
        del engine.model.forward
    assert seen == [[10, 10, 10], [1, 1, 1, 37]]  # decodes first, then a 37-token chunk of the long prompt
    assert sorted(out.request_id for out in outs) == ["p0", "p1", "p2"]  # "long" is still prefilling


@pytest.mark.parametrize("budget", [7, 16, 33])
def test_chunked_prefill_matches_one_shot(tiny, budget):
    ids = prompt(45, seed=3)
    sampling = dataclasses.replace(GREEDY, logprobs=5)
    one_shot = Engine(tiny, kv_cache_tokens=512)
    chunked = Engine(tiny, kv_cache_tokens=512, scheduling=SchedulingConfig(max_num_batched_tokens=budget))
    firsts = []
    for engine in (one_shot, chunked):
        engine.add_request("r", ids, sampling)
        outs = []
        while not outs:
            outs = engine.step()
        firsts.append(outs[0])
    torch.testing.assert_close(chunked.export_kv("r"), one_shot.export_kv("r"), rtol=1e-5, atol=1e-5)
    expected, got = firsts
    assert got.token_id == expected.token_id
    assert [t for t, _ in got.top_logprobs] == [t for t, _ in expected.top_logprobs]
    torch.testing.assert_close(
        torch.tensor([lp for _, lp in got.top_logprobs]), torch.tensor([lp for _, lp in expected.top_logprobs]), rtol=0, atol=1e-4
    )
    assert drive(chunked) == drive(one_shot)  # the rest of the generation too
    # The synchronous path chunks by the same budget.
    sync = Engine(tiny, kv_cache_tokens=512, scheduling=SchedulingConfig(max_num_batched_tokens=budget))
    assert sync.prefill("r", ids, sampling).token_id == expected.token_id


def test_seeded_sampling_does_not_depend_on_batch_mates(tiny):
    me = ("me", prompt(23, seed=5), SEEDED)
    reference = alone(tiny, *me)
    assert reference == alone(tiny, *me)  # across runs
    assert len(set(reference)) > 3
    mates = [(f"m{i}", prompt(5 + 9 * i, seed=20 + i), dataclasses.replace(SEEDED, seed=100 + i, max_tokens=3 + 2 * i)) for i in range(6)]
    compositions = [
        {0: [me]},
        {0: [*mates[:3], me], 4: mates[3:]},
        {0: mates[:2], 2: [me], 3: mates[2:]},
    ]
    for budget in (2048, 11):  # one-shot and chunked prefill
        for arrivals in compositions:
            engine = Engine(tiny, kv_cache_tokens=4096, scheduling=SchedulingConfig(max_num_batched_tokens=budget))
            assert drive(engine, arrivals)["me"] == reference
    other_seed = alone(tiny, "me", me[1], dataclasses.replace(SEEDED, seed=12))
    assert other_seed != reference


def test_two_hundred_requests_with_random_cancellations_return_every_page(tiny):
    rng = random.Random(0)
    engine = Engine(tiny, kv_cache_tokens=1024, block_size=16, scheduling=SchedulingConfig(max_num_batched_tokens=48, max_waiting=32))
    baseline = engine.num_free_blocks
    pending = [
        (f"r{i}", prompt(rng.randint(1, 90), seed=i), SamplingParams(
            temperature=rng.choice([0.0, 1.0]), seed=i, max_tokens=rng.randint(1, 24), ignore_eos=rng.random() < 0.5
        ))
        for i in range(200)
    ]
    live: set[str] = set()
    cancelled = {"queued": 0, "prefilling": 0, "decoding": 0, "finished": 0}
    finished = 0
    while pending or engine.has_unfinished:
        while pending and engine.can_queue() and rng.random() < 0.7:
            request_id, ids, sampling = pending.pop()
            if rng.random() < 0.1:
                engine.add_handoff_request(request_id, ids, sampling)  # released by the engine itself
            else:
                engine.add_request(request_id, ids, sampling)
                live.add(request_id)
        for request_id in rng.sample(sorted(live), k=min(len(live), rng.choice([0, 0, 1, 2]))):
            cancelled[_state(engine, request_id)] += 1
            engine.abort(request_id)
            live.discard(request_id)
        for out in engine.step():
            if out.finish_reason is not None and out.request_id in live:
                finished += 1
                if rng.random() < 0.8:  # the rest stay finished-but-held until the end
                    engine.free(out.request_id)
                    live.discard(out.request_id)
        assert engine.num_free_blocks >= 0
    for request_id in live:
        engine.free(request_id)
    assert engine.num_free_blocks == baseline and engine.allocator.num_free == engine.num_blocks
    assert engine.num_sequences == 0 and engine.num_waiting == 0 and not engine.has_unfinished
    assert min(cancelled.values()) > 0, cancelled  # every kind of cancellation happened
    assert finished > 50


def _state(engine: Engine, request_id: str) -> str:
    seq = engine.scheduler.admitted.get(request_id)
    if seq is None:
        return "queued"
    if seq.finish_reason is not None:
        return "finished"
    return "prefilling" if seq.prefilling else "decoding"


def test_full_cache_makes_requests_wait_not_fail(tiny):
    engine = Engine(tiny, kv_cache_tokens=128, block_size=16, scheduling=SchedulingConfig(max_waiting=5))
    sampling = dataclasses.replace(GREEDY, max_tokens=20)  # 20 + 20 tokens: 3 of the 8 pages each
    added = 0
    with pytest.raises(QueueFullError):
        for i in range(100):
            engine.add_request(f"r{i}", prompt(20, seed=i), sampling)
            added += 1
    assert added == 5 and engine.num_waiting == 5
    most_running = 0
    tokens = {}
    while engine.has_unfinished:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token_id)
            if out.finish_reason is not None:
                engine.free(out.request_id)
        most_running = max(most_running, engine.num_running)
        assert engine.num_free_blocks >= 0
    assert most_running == 2  # two fit at a time (6 of 8 pages); the rest waited their turn
    assert sorted(tokens) == [f"r{i}" for i in range(5)] and all(len(t) == 20 for t in tokens.values())
    with pytest.raises(KvCapacityError):
        engine.add_request("huge", prompt(100, seed=1), dataclasses.replace(GREEDY, max_tokens=29))
    assert engine.num_waiting == 0 and engine.num_free_blocks == engine.num_blocks


def test_logprobs_are_log_softmax_of_the_logits(tiny):
    ids = prompt(19, seed=4)
    sampling = dataclasses.replace(SEEDED, logprobs=5, max_tokens=3)
    engine = Engine(tiny, kv_cache_tokens=512)
    engine.add_request("r", ids, sampling)
    engine.add_request("no-logprobs", ids, SEEDED)
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    mine = [out for out in outs if out.request_id == "r"]
    assert all(out.logprob is None and out.top_logprobs == [] for out in outs if out.request_id == "no-logprobs")
    context = list(ids)
    for out in mine:
        expected = torch.log_softmax(reference_logits(tiny, context), dim=-1)
        assert out.logprob == pytest.approx(float(expected[out.token_id]), abs=1e-4)
        top = torch.topk(expected, 5)
        assert [t for t, _ in out.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in out.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        context.append(out.token_id)
    engine = Engine(tiny, kv_cache_tokens=512)
    first = engine.prefill("zero", ids, dataclasses.replace(GREEDY, logprobs=0))
    assert first.logprob is not None and first.top_logprobs == []


def reference_logits(loaded, ids: list[int]) -> torch.Tensor:
    """The plain model (not the engine's packed twin), whole context at once: logits `[vocab]` of the last token."""
    cache = PagedKVCache(loaded.config, 16, 16)
    batch = ForwardBatch.build([SequenceChunk(list(range(16)), 0, len(ids))], 16)
    with torch.inference_mode():
        return loaded.model(torch.tensor(ids), batch, cache)[0]


def test_handoff_requests_return_kv_and_leave_nothing(tiny):
    ids = prompt(37, seed=8)
    engine = Engine(tiny, kv_cache_tokens=1024)
    engine.add_handoff_request("h", ids, SEEDED)
    engine.add_handoff_request("done", ids, dataclasses.replace(SEEDED, max_tokens=1))
    engine.add_request("stays", ids, SEEDED)
    outs = {out.request_id: out for out in engine.step()}
    assert not engine.holds("h") and not engine.holds("done") and engine.holds("stays")
    assert outs["done"].finish_reason == "length" and outs["done"].kv is None  # nothing to hand off
    reference = Engine(tiny, kv_cache_tokens=1024)
    first, kv = reference.prefill_and_export("h", ids, SEEDED)
    assert outs["h"].token_id == first.token_id and outs["h"].finish_reason is None
    torch.testing.assert_close(outs["h"].kv, kv, rtol=1e-5, atol=1e-5)
    decode = Engine(tiny, kv_cache_tokens=1024, block_size=8)
    decode.add_prefilled("h", len(ids), outs["h"].token_id, outs["h"].kv, SEEDED)
    assert [first.token_id, *drive(decode)["h"]] == alone(tiny, "h", ids, SEEDED)


def test_a_failed_step_releases_its_requests(tiny):
    engine = Engine(tiny, kv_cache_tokens=512)
    engine.add_request("a", prompt(5, seed=1), GREEDY)
    engine.step()
    engine.add_request("b", prompt(9, seed=2), GREEDY)
    engine.add_request("queued", prompt(9, seed=3), GREEDY)
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, max_num_seqs=2)

    def broken(*args):
        raise RuntimeError("boom")

    engine.model.forward = broken
    try:
        with pytest.raises(StepError) as info:
            engine.step()
    finally:
        del engine.model.forward
    assert sorted(info.value.request_ids) == ["a", "b"]
    assert not engine.holds("a") and engine.holds("queued") and engine.num_waiting == 1
    assert drive(engine)["queued"]  # the engine still works
    assert engine.num_free_blocks == engine.num_blocks


def test_smollm2_batched_greedy_matches_alone(smollm2):
    tokenizer = smollm2.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
    requests = [(f"r{i}", tokenizer.encode(text), dataclasses.replace(GREEDY, max_tokens=8)) for i, text in enumerate(texts)]
    expected = {rid: alone(smollm2, rid, ids, sampling) for rid, ids, sampling in requests}
    engine = Engine(smollm2, kv_cache_tokens=1024, scheduling=SchedulingConfig(max_num_batched_tokens=8))
    assert drive(engine, {0: requests[:2], 3: requests[2:]}) == expected
