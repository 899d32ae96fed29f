"""The session API: push/pull round trips, refusals before any byte moves, one message per rank pair."""

import asyncio
import dataclasses
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.reshard_reference import read_dense, reference_reshard, reference_shards
from shared.kv_spec import IncompatibleKvError, KvSpec
from shared.layouts import DecoderLayout, LayoutError, PrefillLayout, valid_tp
from shared.protocol import TransferStats
from shared.session import (
    KvSessionEngine,
    KvTransferError,
    LoopbackAnnouncer,
    PagedKv,
    SessionOffer,
    UcxKvTransport,
)
from shared.transfer_plan import plan_transfer
from shared.transport.ucx_kv import KvReceiver, KvSender

SPEC = KvSpec("tiny", num_layers=3, num_q_heads=8, num_kv_heads=4, head_dim=8, page_size=4)
SENTINEL = -7.0


class FakeWire:
    """Messages in flight, by tag."""

    def __init__(self) -> None:
        self._messages: dict[int, asyncio.Future] = {}

    def slot(self, tag: int) -> asyncio.Future:
        return self._messages.setdefault(tag, asyncio.get_running_loop().create_future())


class RecordingTransport:
    """An in-memory `KvTransport` that records every call; `mangle` may damage what is sent."""

    def __init__(self, wire: FakeWire, mangle=None):
        self.wire = wire
        self.mangle = mangle or (lambda index, data: data)
        self.sends: list[tuple[tuple[str, int], list]] = []
        self.receives: list[list] = []

    def address(self) -> tuple[str, int]:
        return ("fake-host", 1234)

    async def send(self, peer, segments, buffers):
        self.sends.append((peer, list(segments)))
        index = 0
        async for buffer in buffers:
            data = buffer.reshape(-1).view(torch.uint8).clone()
            self.wire.slot(segments[index].tag).set_result(self.mangle(index, data))
            index += 1
        assert index == len(segments)
        return TransferStats(sum(s.nbytes for s in segments), 0.0, len(segments))

    async def receive(self, segments, timeout):
        self.receives.append(list(segments))
        async with asyncio.timeout(timeout):
            buffers = [await self.wire.slot(segment.tag) for segment in segments]
        return buffers, TransferStats(sum(b.numel() for b in buffers), 0.0, len(buffers))

    @property
    def num_messages(self) -> int:
        return sum(len(segments) for _, segments in self.sends)


def make_pair(src_spec, src_layout, dst_spec, dst_layout, *, mangle=None, receive_timeout=5.0, allow_dtype_cast=True):
    wire, announcer = FakeWire(), LoopbackAnnouncer()
    prefill = KvSessionEngine(src_spec, src_layout, RecordingTransport(wire, mangle), announcer)
    decoder = KvSessionEngine(
        dst_spec, dst_layout, RecordingTransport(wire), announcer,
        receive_timeout=receive_timeout, allow_dtype_cast=allow_dtype_cast,
    )
    announcer.register("decoder-0", decoder)
    return prefill, decoder, announcer


def random_kv(spec, num_tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, 2, num_tokens, spec.num_kv_heads, spec.head_dim)
    return torch.randn(shape, generator=generator).to(spec.dtype)


def sentinel_cache(spec, num_blocks):
    key = torch.full(spec.cache_shape(num_blocks), SENTINEL, dtype=spec.dtype)
    return key, key.clone()


async def test_tp4_to_dp2_tp2_round_trip_with_one_message_per_rank_pair():
    dst_spec = dataclasses.replace(SPEC, page_size=3, memory_layout="HND", dtype=torch.bfloat16)
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(tp=4), dst_spec, DecoderLayout(dp=2, tp=2))
    kv = random_kv(SPEC, 11)
    session = prefill.create_session(session_id="req-1", layout=PrefillLayout(tp=4))
    sent = await session.push(kv, target_layout=DecoderLayout(dp=2, tp=2), dst_dp_group=1)
    pulled = await decoder.pull("req-1")

    plan = plan_transfer(PrefillLayout(tp=4), DecoderLayout(dp=2, tp=2), SPEC, dst_spec, 1)
    assert len(plan.pairs) == 4
    assert prefill.transport.num_messages == len(plan.pairs) == sent.num_messages == pulled.stats.num_messages
    assert len(prefill.transport.sends) == 1 and prefill.transport.sends[0][0] == ("fake-host", 1234)
    assert sent.nbytes == plan.nbytes(11)

    got_key, got_value = sentinel_cache(dst_spec, 6)
    want_key, want_value = sentinel_cache(dst_spec, 6)
    table = [5, 0, 3, 1]
    pulled.write_into(got_key, got_value, table)
    reference_reshard(kv, dst_spec, want_key, want_value, table)
    assert torch.equal(got_key, want_key) and torch.equal(got_value, want_value)
    assert torch.equal(pulled.dense(), kv.to(torch.bfloat16))
    oracle = reference_shards(kv, DecoderLayout(dp=2, tp=2), dst_spec, 1)
    assert {r: s.shape for r, s in pulled.shards().items()} == {r: s.shape for r, s in oracle.items()}
    assert all(torch.equal(pulled.shards()[r], oracle[r]) for r in oracle)


@st.composite
def session_cases(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3, 6]))
    base = KvSpec("m", num_layers=draw(st.integers(1, 4)), num_q_heads=kv_heads * draw(st.sampled_from([1, 2])),
                  num_kv_heads=kv_heads, head_dim=draw(st.sampled_from([2, 4])))

    def storage():
        return dict(page_size=draw(st.sampled_from([1, 2, 5])), memory_layout=draw(st.sampled_from(["NHD", "HND"])),
                    dtype=draw(st.sampled_from([torch.float32, torch.float16])))

    src = PrefillLayout(tp=draw(st.sampled_from(valid_tp(base))), pp=draw(st.integers(1, base.num_layers)))
    dp = draw(st.integers(1, 2))
    dst = DecoderLayout(dp=dp, tp=draw(st.sampled_from(valid_tp(base))), pp=draw(st.integers(1, base.num_layers)))
    src_spec, dst_spec = dataclasses.replace(base, **storage()), dataclasses.replace(base, **storage())
    return src_spec, src, dst_spec, dst, draw(st.integers(0, dp - 1)), draw(st.integers(1, 12)), draw(st.booleans())


@settings(max_examples=100, deadline=None)
@given(session_cases())
def test_pull_of_push_equals_the_reference_reshard(case):
    src_spec, src, dst_spec, dst, group, num_tokens, paged = case

    async def run():
        prefill, decoder, _ = make_pair(src_spec, src, dst_spec, dst)
        kv = random_kv(src_spec, num_tokens, seed=num_tokens)
        if paged:  # push straight from the prefill's paged cache
            pages = -(-num_tokens // src_spec.page_size)
            key, value = sentinel_cache(src_spec, pages + 1)
            table = list(range(pages + 1))[::-1][:pages]
            reference_reshard(kv, src_spec, key, value, table)
            payload = PagedKv(key, value, table, num_tokens)
        else:
            payload = kv
        await prefill.create_session("s", layout=src).push(payload, target_layout=dst, dst_dp_group=group)
        return kv, await decoder.pull("s"), prefill.transport.num_messages

    kv, pulled, messages = asyncio.run(run())
    assert messages == len(pulled.plan.pairs)
    blocks = -(-num_tokens // dst_spec.page_size) + 2
    table = random.Random(num_tokens).sample(range(blocks), blocks - 2)
    got_key, got_value = sentinel_cache(dst_spec, blocks)
    want_key, want_value = sentinel_cache(dst_spec, blocks)
    pulled.write_into(got_key, got_value, table)
    reference_reshard(kv, dst_spec, want_key, want_value, table)
    assert torch.equal(got_key, want_key) and torch.equal(got_value, want_value)


MISMATCHES = {
    "model_fingerprint": dataclasses.replace(SPEC, model_fingerprint="other-model"),
    "num_layers": dataclasses.replace(SPEC, num_layers=4),
    "head_dim": dataclasses.replace(SPEC, head_dim=16),
    "num_kv_heads": dataclasses.replace(SPEC, num_kv_heads=2),
    "dtype": dataclasses.replace(SPEC, dtype=torch.float8_e4m3fn),
}


@pytest.mark.parametrize("field", MISMATCHES)
async def test_mismatched_decoder_is_refused_before_any_byte_moves(field):
    prefill, decoder, announcer = make_pair(SPEC, PrefillLayout(tp=2), MISMATCHES[field], DecoderLayout(tp=2))
    with pytest.raises(IncompatibleKvError) as caught:
        await prefill.create_session("req-x", layout=PrefillLayout(tp=2)).push(random_kv(SPEC, 5), target_layout=DecoderLayout(tp=2))
    assert caught.value.field == field
    assert prefill.transport.sends == [] and decoder.transport.receives == []
    assert len(announcer.offers) == 1  # only the small offer travelled
    assert decoder._incoming == {}  # nothing staged for the refused session


async def test_dtype_change_is_refused_when_casting_is_disabled():
    half = dataclasses.replace(SPEC, dtype=torch.float16)
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(), half, DecoderLayout(), allow_dtype_cast=False)
    with pytest.raises(IncompatibleKvError) as caught:
        await prefill.create_session("req-d").push(random_kv(SPEC, 3), target_layout=DecoderLayout())
    assert caught.value.field == "dtype" and "float32" in str(caught.value) and "float16" in str(caught.value)
    assert prefill.transport.sends == [] and decoder.transport.receives == []


async def test_impossible_target_layout_is_refused_before_the_offer():
    prefill, _, announcer = make_pair(SPEC, PrefillLayout(), SPEC, DecoderLayout(tp=4))
    with pytest.raises(IncompatibleKvError) as caught:
        await prefill.create_session("req-l").push(random_kv(SPEC, 3), target_layout=DecoderLayout(tp=3))
    assert caught.value.field == "target_layout" and "Valid tp: 1, 2, 4, 8" in str(caught.value)
    assert announcer.offers == [] and prefill.transport.sends == []
    with pytest.raises(LayoutError):
        prefill.create_session("req-bad", layout=PrefillLayout(tp=3))


async def test_decoder_refuses_a_session_for_another_layout():
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(), SPEC, DecoderLayout(tp=4))
    pulling = asyncio.create_task(decoder.pull("req-w"))  # a pull already waiting hears the refusal too
    await asyncio.sleep(0)
    with pytest.raises(IncompatibleKvError) as pushed:
        await prefill.create_session("req-w").push(random_kv(SPEC, 3), target_layout=DecoderLayout(tp=2))
    with pytest.raises(IncompatibleKvError) as pulled:
        await pulling
    assert pushed.value.field == pulled.value.field == "target_layout"
    assert "this decoder runs DecoderLayout(dp=1, ep=1, tp=4, pp=1)" in str(pushed.value)
    assert prefill.transport.sends == []


async def test_tampered_segments_are_refused():
    _, decoder, announcer = make_pair(SPEC, PrefillLayout(), SPEC, DecoderLayout())
    prefill_plan = plan_transfer(PrefillLayout(), DecoderLayout(), SPEC, SPEC)
    from shared.session import layout_to_wire, spec_to_wire, wire_segments

    segments = wire_segments(prefill_plan, "req-t", 4)
    segments[0].nbytes += 1
    offer = SessionOffer("req-t", spec_to_wire(SPEC), layout_to_wire(PrefillLayout()), layout_to_wire(DecoderLayout()), 0, 4, segments)
    reply = await announcer.offer(offer, "decoder-0")
    assert reply.field == "segments"
    assert decoder.transport.receives == []


async def test_partial_transfer_writes_nothing():
    truncate_second = lambda index, data: data[:-1] if index == 1 else data  # noqa: E731
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(tp=2), SPEC, DecoderLayout(tp=4), mangle=truncate_second)
    await prefill.create_session("req-p", layout=PrefillLayout(tp=2)).push(random_kv(SPEC, 6), target_layout=DecoderLayout(tp=4))
    with pytest.raises(KvTransferError) as caught:
        await decoder.pull("req-p")
    assert "expected" in str(caught.value)
    assert decoder._incoming == {}


async def test_missing_bytes_time_out_and_write_nothing():
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(), SPEC, DecoderLayout(), receive_timeout=0.2)
    original_send = prefill.transport.send

    async def drop_everything(peer, segments, buffers):
        return TransferStats(0, 0.0, 0)

    prefill.transport.send = drop_everything
    await prefill.create_session("req-lost").push(random_kv(SPEC, 2), target_layout=DecoderLayout())
    prefill.transport.send = original_send
    with pytest.raises(KvTransferError) as caught:
        await decoder.pull("req-lost")
    assert "KV did not arrive within 0.2 s" in str(caught.value)
    assert decoder._incoming == {}


async def test_push_over_real_ucx_tp4_to_dp2_tp2():
    receiver = KvReceiver()
    await receiver.start()
    sender = KvSender()
    announcer = LoopbackAnnouncer()
    dst_layout = DecoderLayout(dp=2, tp=2)
    dst_spec = dataclasses.replace(SPEC, page_size=8, memory_layout="HND")
    prefill = KvSessionEngine(SPEC, PrefillLayout(tp=4), UcxKvTransport(sender=sender), announcer)
    decoder = KvSessionEngine(dst_spec, dst_layout, UcxKvTransport(receiver=receiver), announcer, receive_timeout=30)
    announcer.register("decoder-0", decoder)
    try:
        kv = random_kv(SPEC, 37, seed=3)
        pages = -(-37 // SPEC.page_size)
        key, value = sentinel_cache(SPEC, pages)
        reference_reshard(kv, SPEC, key, value, list(range(pages)))
        session = prefill.create_session(session_id="req-ucx", layout=PrefillLayout(tp=4))
        pulling = asyncio.create_task(decoder.pull("req-ucx"))
        sent = await session.push(PagedKv(key, value, list(range(pages)), 37), target_layout=dst_layout, dst_dp_group=0)
        pulled = await pulling
    finally:
        await sender.close()
        await receiver.close()
    assert sent.num_messages == pulled.stats.num_messages == len(pulled.plan.pairs) == 4
    assert torch.equal(read_dense(key, value, SPEC, list(range(pages)), 37), kv)
    got_key, got_value = sentinel_cache(dst_spec, 6)
    want_key, want_value = sentinel_cache(dst_spec, 6)
    pulled.write_into(got_key, got_value, [4, 1, 5, 0, 2])
    reference_reshard(kv, dst_spec, want_key, want_value, [4, 1, 5, 0, 2])
    assert torch.equal(got_key, want_key) and torch.equal(got_value, want_value)


async def test_pushes_gather_into_reused_staging_and_send_whole_slabs_in_place():
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(tp=2), SPEC, DecoderLayout())
    for session_id in ("req-a", "req-b"):  # the second push reuses the first one's staging buffers
        await prefill.create_session(session_id, layout=PrefillLayout(tp=2)).push(random_kv(SPEC, 9), target_layout=DecoderLayout())
        idle = prefill.staging.idle_bytes
        assert torch.equal((await decoder.pull(session_id)).dense(), random_kv(SPEC, 9))
    assert idle == 2 << 20 and len(prefill.staging._idle) == 2  # two head-sliced pairs, two pooled buffers

    # pp=3 -> pp=1: each pair is every head of a run of layers, one contiguous slab of the KV
    slabs, decoder, _ = make_pair(SPEC, PrefillLayout(pp=3), SPEC, DecoderLayout())
    await slabs.create_session("req-c", layout=PrefillLayout(pp=3)).push(random_kv(SPEC, 9), target_layout=DecoderLayout())
    assert slabs.staging.idle_bytes == 0 and slabs.transport.num_messages == 3
    assert torch.equal((await decoder.pull("req-c")).dense(), random_kv(SPEC, 9))


async def test_a_refused_push_gives_its_staging_back():
    prefill, _, _ = make_pair(SPEC, PrefillLayout(tp=2), MISMATCHES["head_dim"], DecoderLayout(tp=2))
    with pytest.raises(IncompatibleKvError):
        await prefill.create_session("req-r", layout=PrefillLayout(tp=2)).push(random_kv(SPEC, 5), target_layout=DecoderLayout(tp=2))
    assert prefill.staging._lent == {}
