"""KV bytes over real UCX (ucxx over TCP/shared memory on this CPU host), and the host buffers they use."""

import asyncio

import pytest
import torch

from shared.protocol import KvSegment
from shared.transport.host_memory import HUGE_PAGE, host_buffer
from shared.transport.staging_pool import StagingPool
from shared.transport.ucx_kv import KvReceiver, KvSender, segment_tag


async def test_segments_arrive_intact_and_matched_by_tag():
    receiver = KvReceiver()
    await receiver.start()
    sender = KvSender()
    try:
        tensors = [torch.randn(3, 2, 17, 4, 8), torch.randn(5, dtype=torch.float32).to(torch.bfloat16)]
        segments = [KvSegment(i, 0, segment_tag("req-1", i, 0), t.numel() * t.element_size()) for i, t in enumerate(tensors)]
        # Post receives in the opposite order of sends: tags, not order, must match them.
        receiving = asyncio.create_task(receiver.receive(list(reversed(segments)), timeout=30))
        sent = await sender.send("127.0.0.1", receiver.port, segments, tensors)
        buffers, received = await receiving
        assert received.nbytes == sent.nbytes == sum(s.nbytes for s in segments)
        assert received.num_messages == 2
        got = [buffers[1].view(torch.float32).reshape(tensors[0].shape), buffers[0].view(torch.bfloat16)]
        assert torch.equal(got[0], tensors[0])
        assert torch.equal(got[1], tensors[1])
    finally:
        await sender.close()
        await receiver.close()


async def test_receive_times_out_instead_of_hanging():
    receiver = KvReceiver()
    await receiver.start()
    try:
        with pytest.raises(TimeoutError):
            await receiver.receive([KvSegment(0, 0, segment_tag("never-sent", 0, 0), 64)], timeout=0.5)
    finally:
        await receiver.close()


def test_segment_tags_differ_per_session_and_rank_pair():
    tags = {segment_tag(s, a, b) for s in ("a", "b") for a in range(3) for b in range(3)}
    assert len(tags) == 18


async def test_send_takes_its_buffers_from_an_async_iterable():
    receiver = KvReceiver()
    await receiver.start()
    sender = KvSender()
    tensors = [torch.randn(4096) for _ in range(3)]
    segments = [KvSegment(i, 0, segment_tag("req-pipe", i, 0), t.numel() * 4) for i, t in enumerate(tensors)]

    async def gathered_one_by_one():
        for tensor in tensors:
            await asyncio.sleep(0.01)  # a gather in progress
            yield tensor

    try:
        receiving = asyncio.create_task(receiver.receive(segments, timeout=30))
        sent = await sender.send("127.0.0.1", receiver.port, segments, gathered_one_by_one())
        buffers, _ = await receiving
    finally:
        await sender.close()
        await receiver.close()
    assert sent.num_messages == 3
    assert all(torch.equal(b.view(torch.float32), t) for b, t in zip(buffers, tensors))


async def test_a_send_with_fewer_buffers_than_segments_fails():
    receiver = KvReceiver()
    await receiver.start()
    sender = KvSender()
    segments = [KvSegment(i, 0, segment_tag("req-short", i, 0), 16) for i in range(2)]
    try:
        with pytest.raises(ValueError) as caught:
            await sender.send("127.0.0.1", receiver.port, segments, [torch.zeros(4)])
    finally:
        await sender.close()
        await receiver.close()
    assert "1 buffers for 2 segments" in str(caught.value)


def test_staging_pool_reuses_buffers_of_near_sizes_and_bounds_idle_memory():
    pool = StagingPool(max_idle_bytes=3 << 20)
    first = pool.take(1000)
    first.fill_(7)
    pool.give_back(first)
    pool.give_back(first)  # twice: ignored
    again = pool.take(1500)  # fits the same 1 MiB buffer
    assert again.data_ptr() == first.data_ptr() and again.numel() == 1500
    assert pool.idle_bytes == 0
    big = [pool.take(2 << 20) for _ in range(2)]
    for buffer in [again, *big]:
        pool.give_back(buffer)
    assert pool.idle_bytes == 2 << 20  # the oldest went beyond the bound


def test_large_host_buffers_are_huge_page_aligned():
    buffer = host_buffer(9 << 20)
    buffer.fill_(1)
    assert buffer.numel() == 9 << 20 and buffer.data_ptr() % HUGE_PAGE == 0
    assert host_buffer(1000).numel() == 1000


def test_staging_pool_forgets_buffers_a_failed_send_may_still_read():
    pool = StagingPool()
    lent = pool.take(1000)
    pool.forget(lent)
    pool.give_back(lent)  # no longer on the books: not pooled for reuse
    assert pool.idle_bytes == 0 and not pool._lent
