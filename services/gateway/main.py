"""`pdserve gateway`."""

from __future__ import annotations

import argparse

from aiohttp import web

from services.gateway.app import Gateway, GatewayLimits
from services.gateway.dispatcher import Dispatcher
from shared.engine.loader import load_model_config
from shared.engine.tokenizer import load_tokenizer
from shared.log import configure_logging
from shared.runtime import close_nats, connect_nats, stop_event_on_signals
from shared.subjects import Subjects


async def run(args: argparse.Namespace) -> int:
    log = configure_logging("gateway", args.log_level)
    stop = stop_event_on_signals()
    tokenizer = load_tokenizer(args.model)
    config = load_model_config(args.model)
    nc = await connect_nats(args.nats, "pd-gateway")
    dispatcher = Dispatcher(nc, Subjects(args.prefix), stall_timeout_s=args.stall_timeout)
    limits = GatewayLimits(max_model_len=config.max_position_embeddings, default_max_tokens=args.default_max_tokens)
    gateway = Gateway(args.model, tokenizer, dispatcher, limits)
    # handler_cancellation: a client that disconnects cancels its handler, which
    # cancels the request on the workers (see Dispatcher).
    runner = web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    log.info("gateway_started", url=f"http://{args.host}:{args.port}", model=args.model)
    await stop.wait()
    log.info("gateway_stopping")
    await runner.cleanup()
    await close_nats(nc)
    return 0
