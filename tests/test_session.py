"""The session API: push/pull round trips across rank groups, refusals before any byte moves,
one message per rank pair, every rank sending and receiving only its own shard.

The ranks of each side run in this process (`InProcessGroup`), each with its own
transport; the wire is a fake that matches messages by tag, so the tests see exactly which
rank sent what to which address. The same protocol over real processes and real UCX is
exercised by the end-to-end layout tests.
"""

import asyncio
import dataclasses
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.reshard_reference import reference_reshard, reference_shards
from shared.kv_spec import IncompatibleKvError, KvSpec
from shared.layouts import DecoderLayout, LayoutError, PrefillLayout, valid_tp
from shared.protocol import TransferStats
from shared.session import (
    ExportedKv,
    InProcessGroup,
    KvSessionEngine,
    KvTransferError,
    LoopbackAnnouncer,
    PagedKv,
    RankTransfer,
    SessionOffer,
    UcxKvTransport,
    layout_to_wire,
    spec_to_wire,
    wire_segments,
)
from shared.session.rank_plan import RankShard
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
    """One rank's in-memory `KvTransport`, recording every call; `mangle` may damage what is sent."""

    def __init__(self, wire: FakeWire, address: tuple[str, int], mangle=None):
        self.wire = wire
        self._address = address
        self.mangle = mangle or (lambda index, data: data)
        self.sends: list[tuple[tuple[str, int], list]] = []
        self.receives: list[list] = []
        self._sent = 0

    def address(self) -> tuple[str, int]:
        return self._address

    async def send(self, peer, segments, buffers):
        self.sends.append((peer, list(segments)))
        index = 0
        async for buffer in buffers:
            data = buffer.reshape(-1).view(torch.uint8).clone()
            self.wire.slot(segments[index].tag).set_result(self.mangle(self._sent, data))
            index += 1
            self._sent += 1
        assert index == len(segments)
        return TransferStats(sum(s.nbytes for s in segments), 0.0, len(segments))

    async def receive(self, segments, timeout):
        self.receives.append(list(segments))
        async with asyncio.timeout(timeout):
            buffers = [await asyncio.shield(self.wire.slot(segment.tag)) for segment in segments]
        return buffers, TransferStats(sum(b.numel() for b in buffers), 0.0, len(buffers))


class Side:
    """One worker instance: a session engine over an in-process group of ranks with recording transports."""

    def __init__(self, spec, layout, wire, port_base, mangle=None, **engine_options):
        self.spec, self.layout = spec, layout
        self.transports = [RecordingTransport(wire, ("fake-host", port_base + r), mangle) for r in range(layout.world)]
        self.ranks = [RankTransfer(r, t) for r, t in enumerate(self.transports)]
        self.sessions = KvSessionEngine(spec, layout, InProcessGroup(self.ranks), LoopbackAnnouncer(), **engine_options)

    def local_spec(self, rank):
        return RankShard.of(self.layout, rank, self.spec).local_spec(self.spec, self.layout.tp)

    def hold_shards(self, session_id, kv, paged=False):
        """Each rank holds its own shard of `kv`, exported or in a paged cache of its own."""
        for rank, shard in reference_shards(kv, self.layout, self.spec, 0).items():
            if paged:
                spec = self.local_spec(rank)
                pages = -(-kv.shape[2] // spec.page_size)
                key, value = sentinel_cache(spec, pages + 1)
                table = list(range(pages + 1))[::-1][:pages]
                reference_reshard(shard, spec, key, value, table)
                self.ranks[rank].hold(session_id, PagedKv(key, value, table, kv.shape[2]))
            else:
                self.ranks[rank].hold(session_id, shard.contiguous())

    @property
    def num_messages(self) -> int:
        return sum(len(segments) for t in self.transports for _, segments in t.sends)

    @property
    def sends(self):
        return [send for t in self.transports for send in t.sends]

    @property
    def receives(self):
        return [r for t in self.transports for r in t.receives if r]

    @property
    def sessions_held(self) -> int:
        return sum(rank.num_sessions for rank in self.ranks)


def make_pair(src_spec, src_layout, dst_spec, dst_layout, *, mangle=None, lease_s=5.0, allow_dtype_cast=True):
    wire = FakeWire()
    prefill = Side(src_spec, src_layout, wire, 1000, mangle)
    decoder = Side(dst_spec, dst_layout, wire, 2000, lease_s=lease_s, allow_dtype_cast=allow_dtype_cast)
    prefill.sessions.announcer.register("decoder-0", decoder.sessions)
    return prefill, decoder, prefill.sessions.announcer


def random_kv(spec, num_tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, 2, num_tokens, spec.num_kv_heads, spec.head_dim)
    return torch.randn(shape, generator=generator).to(spec.dtype)


def sentinel_cache(spec, num_blocks):
    key = torch.full(spec.cache_shape(num_blocks), SENTINEL, dtype=spec.dtype)
    return key, key.clone()


def assert_ranks_hold(decoder, pulled, kv, dp_group):
    """Each decoder rank received exactly its shard (the oracle's), the other DP groups nothing."""
    oracle = reference_shards(kv, decoder.layout, decoder.spec, dp_group)
    for rank in decoder.ranks:
        if rank.rank in oracle:
            assert torch.equal(rank.inbox[pulled.session_id].shard(), oracle[rank.rank]), f"rank {rank.rank}"
        else:  # outside the request's DP group: nothing posted, nothing received
            assert pulled.session_id not in rank.inbox and rank.bytes_received == 0, f"rank {rank.rank}"


def scatter_and_check(decoder, pulled, kv, dp_group, table):
    """Every rank scatters into its own paged cache; each equals the oracle's shard written token by token."""
    caches = {}
    for rank in decoder.ranks:
        spec = decoder.local_spec(rank.rank)
        caches[rank.rank] = sentinel_cache(spec, max(table) + 1)
        rank.cache = lambda pair=caches[rank.rank]: pair
    pulled.write_into(table)
    for rank, shard in reference_shards(kv, decoder.layout, decoder.spec, dp_group).items():
        spec = decoder.local_spec(rank)
        want_key, want_value = sentinel_cache(spec, max(table) + 1)
        reference_reshard(shard, spec, want_key, want_value, table)
        got_key, got_value = caches[rank]
        assert torch.equal(got_key, want_key) and torch.equal(got_value, want_value), f"rank {rank}"


async def test_tp4_to_dp2_tp2_round_trip_with_one_message_per_rank_pair():
    dst_spec = dataclasses.replace(SPEC, page_size=3, memory_layout="HND", dtype=torch.bfloat16)
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(tp=4), dst_spec, DecoderLayout(dp=2, tp=2))
    kv = random_kv(SPEC, 11)
    prefill.hold_shards("req-1", kv)
    session = prefill.sessions.create_session(session_id="req-1", layout=PrefillLayout(tp=4))
    sent = await session.push(ExportedKv(11), target_layout=DecoderLayout(dp=2, tp=2), dst_dp_group=1)
    pulled = await decoder.sessions.pull("req-1")

    plan = plan_transfer(PrefillLayout(tp=4), DecoderLayout(dp=2, tp=2), SPEC, dst_spec, 1)
    assert len(plan.pairs) == 4
    assert prefill.num_messages == len(plan.pairs) == sent.num_messages == pulled.stats.num_messages
    # rank to rank: each prefill rank sent its one pair straight to the decoder rank holding its heads
    routes = sorted((seg.src_rank, peer) for peer, segments in prefill.sends for seg in segments)
    assert routes == [(pair.src_rank, ("fake-host", 2000 + pair.dst_rank)) for pair in plan.pairs]
    assert all(len(t.sends) == 1 for t in prefill.transports)
    assert sent.nbytes == plan.nbytes(11)
    assert_ranks_hold(decoder, pulled, kv.to(torch.bfloat16), 1)
    scatter_and_check(decoder, pulled, kv, 1, [5, 0, 3, 1])
    assert prefill.sessions_held == 0 and decoder.sessions_held == 0


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
        prefill.hold_shards("s", kv, paged=paged)  # paged: each rank pushes straight from its own pages
        await prefill.sessions.create_session("s", layout=src).push(ExportedKv(num_tokens), target_layout=dst, dst_dp_group=group)
        return prefill, decoder, kv, await decoder.sessions.pull("s")

    prefill, decoder, kv, pulled = asyncio.run(run())
    assert prefill.num_messages == len(pulled.plan.pairs)
    assert_ranks_hold(decoder, pulled, kv, group)
    blocks = -(-num_tokens // dst_spec.page_size) + 2
    scatter_and_check(decoder, pulled, kv, group, random.Random(num_tokens).sample(range(blocks), blocks - 2))
    assert prefill.sessions_held == 0 and decoder.sessions_held == 0


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
    prefill.hold_shards("req-x", random_kv(SPEC, 5))
    with pytest.raises(IncompatibleKvError) as caught:
        await prefill.sessions.create_session("req-x", layout=PrefillLayout(tp=2)).push(ExportedKv(5), target_layout=DecoderLayout(tp=2))
    assert caught.value.field == field
    assert prefill.sends == [] and decoder.receives == []
    assert len(announcer.offers) == 1  # only the small offer travelled
    assert decoder.sessions.num_incoming == 0 and decoder.sessions_held == 0  # nothing staged for the refused session
    assert [list(r.outbox) for r in prefill.ranks] == [["req-x"]] * 2  # the prefill ranks keep their KV for another decoder ...
    prefill.sessions.cancel("req-x")
    assert prefill.sessions_held == 0  # ... until the caller gives up


async def test_dtype_change_is_refused_when_casting_is_disabled():
    half = dataclasses.replace(SPEC, dtype=torch.float16)
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(), half, DecoderLayout(), allow_dtype_cast=False)
    with pytest.raises(IncompatibleKvError) as caught:
        await prefill.sessions.create_session("req-d").push(random_kv(SPEC, 3), target_layout=DecoderLayout())
    assert caught.value.field == "dtype" and "float32" in str(caught.value) and "float16" in str(caught.value)
    assert prefill.sends == [] and decoder.receives == []


async def test_impossible_target_layout_is_refused_before_the_offer():
    prefill, _, announcer = make_pair(SPEC, PrefillLayout(), SPEC, DecoderLayout(tp=4))
    with pytest.raises(IncompatibleKvError) as caught:
        await prefill.sessions.create_session("req-l").push(random_kv(SPEC, 3), target_layout=DecoderLayout(tp=3))
    assert caught.value.field == "target_layout" and "Valid tp: 1, 2, 4, 8" in str(caught.value)
    assert announcer.offers == [] and prefill.sends == []
    with pytest.raises(LayoutError):
        prefill.sessions.create_session("req-bad", layout=PrefillLayout(tp=3))


async def test_a_larger_group_takes_no_kv_in_push():
    prefill, _, announcer = make_pair(SPEC, PrefillLayout(tp=2), SPEC, DecoderLayout())
    with pytest.raises(ValueError, match="one-rank group"):
        await prefill.sessions.create_session("req-k", layout=PrefillLayout(tp=2)).push(random_kv(SPEC, 3), target_layout=DecoderLayout())
    assert announcer.offers == []


async def test_decoder_refuses_a_session_for_another_layout():
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(), SPEC, DecoderLayout(tp=4))
    pulling = asyncio.create_task(decoder.sessions.pull("req-w"))  # a pull already waiting hears the refusal too
    await asyncio.sleep(0)
    with pytest.raises(IncompatibleKvError) as pushed:
        await prefill.sessions.create_session("req-w").push(random_kv(SPEC, 3), target_layout=DecoderLayout(tp=2))
    with pytest.raises(IncompatibleKvError) as pulled:
        await pulling
    assert pushed.value.field == pulled.value.field == "target_layout"
    assert "this decoder runs DecoderLayout(dp=1, ep=1, tp=4, pp=1)" in str(pushed.value)
    assert prefill.sends == []


async def test_tampered_segments_are_refused():
    _, decoder, announcer = make_pair(SPEC, PrefillLayout(), SPEC, DecoderLayout())
    prefill_plan = plan_transfer(PrefillLayout(), DecoderLayout(), SPEC, SPEC)
    segments = wire_segments(prefill_plan, "req-t", 4)
    segments[0].nbytes += 1
    offer = SessionOffer("req-t", spec_to_wire(SPEC), layout_to_wire(PrefillLayout()), layout_to_wire(DecoderLayout()), 0, 4, segments)
    reply = await announcer.offer(offer, "decoder-0")
    assert reply.field == "segments"
    assert decoder.receives == []


async def test_partial_transfer_writes_nothing():
    truncate_second = lambda index, data: data[:-1] if index == 1 else data  # noqa: E731
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(), SPEC, DecoderLayout(tp=4), mangle=truncate_second)
    await prefill.sessions.create_session("req-p").push(random_kv(SPEC, 6), target_layout=DecoderLayout(tp=4))
    with pytest.raises(KvTransferError) as caught:
        await decoder.sessions.pull("req-p")
    assert "expected" in str(caught.value) and "received" in str(caught.value)
    assert decoder.sessions.num_incoming == 0 and decoder.sessions_held == 0  # every rank let go, the intact ones too


async def test_missing_bytes_expire_with_the_lease_and_write_nothing():
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(), SPEC, DecoderLayout(tp=2), lease_s=0.2)
    for transport in prefill.transports:
        async def drop_everything(peer, segments, buffers):
            return TransferStats(0, 0.0, 0)

        transport.send = drop_everything
    await prefill.sessions.create_session("req-lost").push(random_kv(SPEC, 2), target_layout=DecoderLayout(tp=2))
    with pytest.raises(KvTransferError) as caught:
        await decoder.sessions.pull("req-lost")
    assert "did not arrive" in str(caught.value) and "within 0.2 s" in str(caught.value)
    assert decoder.sessions.num_incoming == 0 and decoder.sessions_held == 0


async def test_a_push_cannot_outlive_its_lease_even_when_retried():
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(tp=2), SPEC, DecoderLayout(), lease_s=5.0)
    prefill.sessions.lease_s = 0.2

    async def never_answers(offer, decoder_name):
        await asyncio.sleep(30)

    prefill.sessions.announcer.offer = never_answers
    prefill.hold_shards("req-slow", random_kv(SPEC, 4))
    started = asyncio.get_running_loop().time()
    for _ in range(2):  # a retry under the same id shares the first attempt's lease
        with pytest.raises(KvTransferError, match="lease"):
            await prefill.sessions.create_session("req-slow", layout=PrefillLayout(tp=2)).push(ExportedKv(4), target_layout=DecoderLayout())
    assert asyncio.get_running_loop().time() - started < 1.0
    prefill.sessions.cancel("req-slow")
    assert prefill.sessions_held == 0


async def test_push_over_real_ucx_tp2_to_dp2_tp2_rank_to_rank():
    """Each rank its own UCX listener and endpoints: prefill rank r's bytes go straight to the decoder ranks of its heads."""
    dst_layout = DecoderLayout(dp=2, tp=2)
    dst_spec = dataclasses.replace(SPEC, page_size=8, memory_layout="HND")
    receivers = [KvReceiver() for _ in range(dst_layout.world)]
    senders = [KvSender() for _ in range(2)]
    for receiver in receivers:
        await receiver.start()
    announcer = LoopbackAnnouncer()
    prefill_ranks = [RankTransfer(r, UcxKvTransport(senders[r], KvReceiver())) for r in range(2)]
    decoder_ranks = [RankTransfer(r, UcxKvTransport(KvSender(), receivers[r])) for r in range(dst_layout.world)]
    prefill = KvSessionEngine(SPEC, PrefillLayout(tp=2), InProcessGroup(prefill_ranks), announcer)
    decoder = KvSessionEngine(dst_spec, dst_layout, InProcessGroup(decoder_ranks), announcer, lease_s=30)
    announcer.register("decoder-0", decoder)
    kv = random_kv(SPEC, 37, seed=3)
    try:
        for rank, shard in reference_shards(kv, PrefillLayout(tp=2), SPEC).items():
            prefill_ranks[rank].hold("req-ucx", shard.contiguous())
        session = prefill.create_session(session_id="req-ucx", layout=PrefillLayout(tp=2))
        pulling = asyncio.create_task(decoder.pull("req-ucx"))
        sent = await session.push(ExportedKv(37), target_layout=dst_layout, dst_dp_group=1)
        pulled = await pulling
    finally:
        for sender in senders:
            await sender.close()
        for receiver in receivers:
            await receiver.close()
    assert sent.num_messages == pulled.stats.num_messages == len(pulled.plan.pairs) == 2
    assert [r.bytes_sent for r in prefill_ranks] == [pulled.plan.pair_nbytes(p, 37) for p in pulled.plan.pairs]
    assert [r.bytes_received for r in decoder_ranks] == [0, 0] + [pulled.plan.pair_nbytes(p, 37) for p in pulled.plan.pairs]
    oracle = reference_shards(kv, dst_layout, dst_spec, 1)
    assert all(torch.equal(decoder_ranks[r].inbox["req-ucx"].shard(), oracle[r]) for r in oracle)


async def test_pushes_gather_into_reused_staging_and_send_whole_slabs_in_place():
    prefill, decoder, _ = make_pair(SPEC, PrefillLayout(), SPEC, DecoderLayout(tp=2))
    staging = prefill.ranks[0].staging
    for session_id in ("req-a", "req-b"):  # the second push reuses the first one's staging buffers
        await prefill.sessions.create_session(session_id).push(random_kv(SPEC, 9), target_layout=DecoderLayout(tp=2))
        idle = staging.idle_bytes
        pulled = await decoder.sessions.pull(session_id)
        assert_ranks_hold(decoder, pulled, random_kv(SPEC, 9), 0)
        decoder.sessions.cancel(session_id)
    assert idle == 2 << 20 and len(staging._idle) == 2  # two head-sliced pairs, two pooled buffers

    # tp=1 -> pp=3: each pair is every head of a run of layers, one contiguous slab of the KV
    slabs, decoder, _ = make_pair(SPEC, PrefillLayout(), SPEC, DecoderLayout(pp=3))
    await slabs.sessions.create_session("req-c").push(random_kv(SPEC, 9), target_layout=DecoderLayout(pp=3))
    assert slabs.ranks[0].staging.idle_bytes == 0 and slabs.num_messages == 3
    assert_ranks_hold(decoder, await decoder.sessions.pull("req-c"), random_kv(SPEC, 9), 0)


async def test_a_refused_push_gives_its_staging_back():
    prefill, _, _ = make_pair(SPEC, PrefillLayout(), MISMATCHES["head_dim"], DecoderLayout(tp=2))
    with pytest.raises(IncompatibleKvError):
        await prefill.sessions.create_session("req-r").push(random_kv(SPEC, 5), target_layout=DecoderLayout(tp=2))
    prefill.sessions.cancel("req-r")
    await asyncio.sleep(0.05)  # the prepared gather's thread finishes, then its staging goes back
    assert prefill.ranks[0].staging._lent == {} and prefill.sessions_held == 0
