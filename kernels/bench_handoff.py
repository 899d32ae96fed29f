"""Hand-off benchmark (a): session push+pull of a smollm2 KV between two processes vs a
raw ucxx send of the same bytes, in the same run, on the same endpoints.

`python -m kernels.bench_handoff [--tokens 4096] [--repeats 7] [--prefill-layout tp=3] [--decode-layout tp=1]`

The decoder runs in a child process: it accepts offers (over a real nats-server, as the
services do), pulls, and re-shards into its paged cache; it then acks over NATS. Timed on
the prefill side from `push` to the ack. The raw baseline sends the same total bytes as
one tagged ucxx message per rank pair and times send to ack the same way. Medians; the
ratio is raw time / session time (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time

import torch

from shared import protocol
from shared.kv_spec import KvSpec
from shared.layouts import parse_layout
from shared.nats_server import EmbeddedNats
from shared.protocol import KvSegment, OfferReply, SessionOffer
from shared.runtime import connect_nats
from shared.transport.ucx_kv import KvReceiver, KvSender, segment_tag

SMOLLM2 = dict(model_fingerprint="smollm2-135m", num_layers=30, num_q_heads=9, num_kv_heads=3, head_dim=64)
OFFER_SUBJECT = "bench.offer"
RAW_SUBJECT = "bench.raw"
DONE_SUBJECT = "bench.done"


def _spec(page_size: int, experts: int = 0) -> KvSpec:
    """SmolLM2's KV shape; `experts` > 0 lets MoE layouts (ep > 1) validate (the KV does not depend on it)."""
    return KvSpec(**SMOLLM2, page_size=page_size, num_experts=experts)


def _decoder(nats_url: str, decode_layout: str, page_size: int, num_tokens: int, experts: int, ready) -> None:
    asyncio.run(_decoder_main(nats_url, decode_layout, page_size, num_tokens, experts, ready))


async def _decoder_main(nats_url: str, decode_layout: str, page_size: int, num_tokens: int, experts: int, ready) -> None:
    from shared.session import InProcessGroup, KvSessionEngine, RankTransfer, UcxKvTransport
    from shared.session.rank_plan import RankShard

    torch.set_num_threads(1)
    spec = _spec(page_size, experts)
    layout = parse_layout(decode_layout, "decode")
    num_blocks = -(-num_tokens // page_size)
    ranks = []
    for rank in range(layout.world):  # every rank its own UCX listener and its own cache of its shard
        receiver = KvReceiver()
        await receiver.start()
        local = RankShard.of(layout, rank, spec).local_spec(spec, layout.tp)
        key = torch.zeros(local.cache_shape(num_blocks), dtype=spec.dtype)
        value = torch.zeros_like(key)
        ranks.append(RankTransfer(rank, UcxKvTransport(KvSender(), receiver), cache=lambda k=key, v=value: (k, v)))
    nc = await connect_nats(nats_url, "bench-decoder")
    sessions = KvSessionEngine(spec, layout, InProcessGroup(ranks), lease_s=120)
    block_table = list(range(num_blocks))
    offer_decoder = protocol.decoder(SessionOffer)
    segments_decoder = protocol.decoder(list[KvSegment])
    raw_receiver = ranks[0].transport.receiver

    async def on_offer(msg) -> None:
        offer = offer_decoder.decode(msg.data)
        await msg.respond(protocol.encode(await sessions.accept(offer)))
        pulled = await sessions.pull(offer.session_id)
        pulled.write_into(block_table)
        await nc.publish(DONE_SUBJECT, offer.session_id.encode())

    async def on_raw(msg) -> None:
        segments = segments_decoder.decode(msg.data)
        receiving = asyncio.create_task(raw_receiver.receive(segments, timeout=120))
        await msg.respond(protocol.encode([raw_receiver.host, raw_receiver.port]))
        await receiving
        await nc.publish(DONE_SUBJECT, b"raw")

    await nc.subscribe(OFFER_SUBJECT, cb=on_offer)
    await nc.subscribe(RAW_SUBJECT, cb=on_raw)
    await nc.flush()
    ready.set()
    await asyncio.Event().wait()


class NatsOfferAnnouncer:
    def __init__(self, nc):
        self.nc = nc
        self._reply = protocol.decoder(OfferReply)

    async def offer(self, offer: SessionOffer, decoder: str | None) -> OfferReply:
        reply = await self.nc.request(OFFER_SUBJECT, protocol.encode(offer), timeout=60)
        return self._reply.decode(reply.data)


async def _prefill_main(nats_url: str, args: argparse.Namespace) -> dict:
    from kernels.reshard_reference import reference_shards
    from shared.session import ExportedKv, InProcessGroup, KvSessionEngine, RankTransfer, UcxKvTransport

    torch.set_num_threads(1)
    spec = _spec(args.page_size, args.experts)
    nc = await connect_nats(nats_url, "bench-prefill")
    done: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_done(msg) -> None:
        done.put_nowait(msg.data)

    await nc.subscribe(DONE_SUBJECT, cb=on_done)
    prefill_layout = parse_layout(args.prefill_layout, "prefill")
    decode_layout = parse_layout(args.decode_layout, "decode")
    # Each prefill rank its own endpoints, holding its own shard (ranks share this process here:
    # this measures the session machinery and UCX, not process start-up).
    ranks = [RankTransfer(r, UcxKvTransport(KvSender(), KvReceiver())) for r in range(prefill_layout.world)]
    sessions = KvSessionEngine(spec, prefill_layout, InProcessGroup(ranks), NatsOfferAnnouncer(nc), lease_s=120)
    kv = torch.randn(spec.num_layers, 2, args.tokens, spec.num_kv_heads, spec.head_dim)
    shards = {rank: shard.contiguous() for rank, shard in reference_shards(kv, prefill_layout, spec).items()}
    raw_sender = ranks[0].transport.sender
    session_s, raw_s, stats = [], [], None
    for i in range(args.repeats + 1):  # the first of each is a warm-up
        for rank, shard in shards.items():
            ranks[rank].hold(f"s{i}", shard)
        session = sessions.create_session(f"s{i}")  # a DP decoder: group 0 takes it
        started = time.perf_counter()
        stats = await session.push(ExportedKv(args.tokens), target_layout=decode_layout)
        await done.get()
        session_s.append(time.perf_counter() - started)

        # The same messages with the same sizes, as plain tagged sends of ready buffers.
        pairs = session.plan.pairs
        segments = [
            KvSegment(p.src_rank, p.dst_rank, segment_tag(f"raw{i}", p.src_rank, p.dst_rank), session.plan.pair_nbytes(p, args.tokens))
            for p in pairs
        ]
        # Real bytes, written before timing (untouched `empty` pages would all read the one zero page).
        buffers = [torch.randint(0, 256, (s.nbytes,), dtype=torch.uint8) for s in segments]
        started = time.perf_counter()
        host, port = protocol.decoder(list).decode(await _raw_request(nc, segments))
        await raw_sender.send(host, port, segments, buffers)
        await done.get()
        raw_s.append(time.perf_counter() - started)
    for rank in ranks:
        await rank.transport.sender.close()
    await nc.close()
    return {"session_s": session_s[1:], "raw_s": raw_s[1:], "nbytes": stats.nbytes, "messages": stats.num_messages}


async def _raw_request(nc, segments) -> bytes:
    reply = await nc.request(RAW_SUBJECT, protocol.encode(segments), timeout=60)
    return reply.data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench_handoff", description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--prefill-layout", default="tp=3")
    parser.add_argument("--decode-layout", default="tp=1")
    parser.add_argument("--experts", type=int, default=0, help="pretend the model has this many experts, so ep layouts validate (e.g. 8)")
    args = parser.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    with EmbeddedNats() as server:
        ready = context.Event()
        decoder = context.Process(
            target=_decoder, args=(server.url, args.decode_layout, args.page_size, args.tokens, args.experts, ready), daemon=True
        )
        decoder.start()
        ready.wait(120)
        try:
            result = asyncio.run(_prefill_main(server.url, args))
        finally:
            decoder.terminate()
            decoder.join(10)
    session, raw = statistics.median(result["session_s"]), statistics.median(result["raw_s"])
    gb = result["nbytes"] / 1e9
    print(f"{args.tokens}-token smollm2 KV, {args.prefill_layout} -> {args.decode_layout}, {result['messages']} UCX messages, {gb * 1000:.1f} MB; medians of {args.repeats}")
    print(f"{'path':<28} {'ms':>9} {'GB/s':>7}")
    print(f"{'raw ucxx send (+ack)':<28} {raw * 1000:>9.1f} {gb / raw:>7.3f}")
    print(f"{'session push+pull+re-shard':<28} {session * 1000:>9.1f} {gb / session:>7.3f}")
    print(f"session / raw throughput: {raw / session:.2f} (goal >= 0.80)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
