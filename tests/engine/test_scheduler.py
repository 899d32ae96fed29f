"""The scheduler alone (no model): admission, the token budget, the bounded queue, freeing from any state."""

import pytest

from shared.engine.kv_cache import BlockAllocator
from shared.engine.sampling import RequestSampler, SamplingParams
from shared.engine.scheduler import (
    KvCacheFullError,
    KvCapacityError,
    QueueFullError,
    Scheduler,
    SchedulingConfig,
)
from shared.engine.sequence import Sequence, SequenceStatus

BLOCK = 4


def seq(request_id: str, prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(request_id, list(range(prompt_len)), prompt_len, RequestSampler(SamplingParams(max_tokens=max_tokens)))


def scheduler(num_blocks: int = 16, **config) -> Scheduler:
    return Scheduler(SchedulingConfig(**config), BlockAllocator(num_blocks), BLOCK)


def plan_of(sched: Scheduler) -> list[tuple[str, int]]:
    return [(chunk.seq.request_id, chunk.num_new) for chunk in sched.schedule()]


def run(sched: Scheduler) -> list[tuple[str, int]]:
    """schedule() and pretend the pass ran: prompts advance, decodes grow by one token."""
    plan = sched.schedule()
    for chunk in plan:
        done = chunk.completes_prompt
        chunk.seq.num_cached += chunk.num_new
        if done:
            chunk.seq.output_ids.append(0)
    return [(chunk.seq.request_id, chunk.num_new) for chunk in plan]


@pytest.mark.parametrize(
    "bad", [{"max_num_batched_tokens": 0}, {"max_num_seqs": 0}, {"max_waiting": -1}]
)
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        SchedulingConfig(**bad)


def test_prompts_are_chunked_within_the_budget_and_decodes_go_first():
    sched = scheduler(num_blocks=32, max_num_batched_tokens=8)
    sched.add(seq("a", 13))
    sched.add(seq("b", 3))
    assert run(sched) == [("a", 8)]  # a takes the whole budget; b waits for the next pass
    assert sched.num_waiting == 1 and sched.num_running == 1
    assert run(sched) == [("a", 5), ("b", 3)]  # a's last chunk, and b is admitted into the rest
    assert run(sched) == [("a", 1), ("b", 1)]  # both decode
    sched.add(seq("c", 20))
    assert run(sched) == [("a", 1), ("b", 1), ("c", 6)]  # decodes first, c's first chunk fills the rest


def test_completes_prompt_marks_the_chunks_that_sample():
    sched = scheduler(num_blocks=32, max_num_batched_tokens=8)
    sched.add(seq("a", 10))
    sched.add(seq("b", 2))
    first = sched.schedule()
    assert [c.completes_prompt for c in first] == [False]
    first[0].seq.num_cached += 8
    second = sched.schedule()
    assert [(c.seq.request_id, c.num_new, c.completes_prompt) for c in second] == [("a", 2, True), ("b", 2, True)]


def test_admission_is_first_come_first_served_and_waits_for_pages():
    sched = scheduler(num_blocks=8)  # 32 tokens
    sched.add(seq("big", 16, max_tokens=8))  # 24 tokens: 6 pages
    sched.add(seq("large", 8, max_tokens=4))  # 12 tokens: 3 pages, more than the 2 left
    sched.add(seq("small", 2, max_tokens=2))  # 1 page: would fit, but must not overtake "large"
    assert run(sched) == [("big", 16)]
    assert sched.allocator.num_free == 2 and sched.num_waiting == 2
    assert run(sched) == [("big", 1)]  # the queue waits; nothing crashes, nothing is evicted
    assert sched.free("big")
    assert run(sched) == [("large", 8), ("small", 2)]
    assert sched.allocator.num_free == 8 - 3 - 1


def test_queue_is_bounded_and_refusals_take_nothing():
    sched = scheduler(num_blocks=4, max_waiting=2)
    sched.add(seq("a", 2))
    sched.add(seq("b", 2))
    assert not sched.can_queue()
    with pytest.raises(QueueFullError):
        sched.add(seq("c", 2))
    with pytest.raises(KvCapacityError) as info:
        scheduler(num_blocks=4).add(seq("huge", 14, max_tokens=3))  # 17 tokens > 16
    assert "17 tokens" in str(info.value) and "16 tokens" in str(info.value)
    with pytest.raises(ValueError):
        sched.add(seq("a", 2))  # duplicate id
    assert sched.num_waiting == 2 and sched.allocator.num_free == 4


def test_max_num_seqs_caps_admission():
    sched = scheduler(num_blocks=64, max_num_seqs=2)
    for name in "abc":
        sched.add(seq(name, 2))
    assert run(sched) == [("a", 2), ("b", 2)]
    assert sched.num_waiting == 1
    sched.finish(sched.admitted["a"], "stop")  # finished: no longer counts as running
    assert run(sched) == [("b", 1), ("c", 2)]


def test_admit_now_goes_ahead_of_the_queue_or_raises_when_full():
    sched = scheduler(num_blocks=4)
    sched.add(seq("queued", 2))
    sched.admit_now(seq("now", 8, max_tokens=4))  # 3 pages
    assert sched.admitted["now"].status is SequenceStatus.RUNNING
    with pytest.raises(KvCacheFullError):
        sched.admit_now(seq("later", 8, max_tokens=4))
    assert sched.allocator.num_free == 1 and "later" not in sched.admitted


def test_free_from_every_state_returns_every_page():
    sched = scheduler(num_blocks=16, max_num_batched_tokens=6)
    for name, length in (("decoding", 3), ("prefilling", 9), ("queued", 2)):
        sched.add(seq(name, length))
    run(sched)
    run(sched)
    assert not sched.admitted["decoding"].prefilling and sched.admitted["prefilling"].prefilling
    sched.admit_now(seq("finished", 2))
    sched.finish(sched.admitted["finished"], "length")
    assert sched.knows("queued") and sched.num_waiting == 1
    for name in ("decoding", "prefilling", "queued", "finished"):
        assert sched.free(name)
    assert not sched.free("finished") and not sched.free("never")
    assert sched.allocator.num_free == 16 and not sched.admitted and sched.num_waiting == 0
