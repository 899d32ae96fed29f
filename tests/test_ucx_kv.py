"""KV bytes over real UCX (ucxx over TCP/shared memory on this CPU host)."""

import asyncio

import pytest
import torch

from shared.protocol import KvSegment
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
