"""`pdserve gateway`."""

from __future__ import annotations

import argparse
import uuid

from aiohttp import web

from services.gateway.app import Gateway, GatewayLimits
from services.gateway.auth import ApiKeys, configured_keys
from services.gateway.dispatcher import Dispatcher
from services.gateway.readiness import ReadinessProbe
from services.gateway.shutdown import drain
from shared.admin import AdminError, start_admin
from shared.engine.generation_defaults import NO_DEFAULTS
from shared.engine.loader import load_generation_defaults, load_model_config
from shared.engine.tokenizer import load_tokenizer
from shared.log import configure_logging
from shared.nats_auth import connect_options_for
from shared.nats_permissions import NatsRole
from shared.runtime import close_nats, connect_nats, stop_event_on_signals
from shared.shutdown import bounded
from shared.subjects import Subjects


def admin_handlers(gateway: Gateway, instance_id: str, url: str) -> dict:
    async def status(_: dict) -> dict:
        return {"instance": instance_id, "kind": "gateway", "url": url, "model": gateway.model_name, "in_flight": len(gateway.in_flight), "draining": gateway.draining}

    async def cancel(body: dict) -> dict:
        request_id = body.get("request_id")
        if not isinstance(request_id, str):
            raise AdminError(400, '"request_id" (a string) is required')
        return {"request_id": request_id, "held": gateway.cancel(request_id)}

    return {"status": status, "cancel": cancel}


async def run(args: argparse.Namespace) -> int:
    log = configure_logging("gateway", args.log_level)
    try:
        api_keys = ApiKeys(configured_keys(args.api_key))
    except ValueError as exc:
        raise SystemExit(f"pdserve gateway: {exc}") from None
    tokenizer = load_tokenizer(args.model)
    config = load_model_config(args.model)
    nc = await connect_nats(args.nats, "pd-gateway", options=connect_options_for(args, NatsRole.GATEWAY))
    subjects = Subjects(args.prefix)
    dispatcher = Dispatcher(nc, subjects, stall_timeout_s=args.stall_timeout, migration_limit=args.migration_limit)
    await dispatcher.start()
    limits = GatewayLimits(
        max_model_len=config.max_position_embeddings,
        default_max_tokens=args.default_max_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        vocab_size=config.vocab_size,
    )
    generation = load_generation_defaults(args.model) if args.generation_config == "model" else NO_DEFAULTS
    gateway = Gateway(args.model, tokenizer, dispatcher, limits, api_keys, ReadinessProbe(nc, subjects, args.model), generation)
    # handler_cancellation: a client that disconnects cancels its handler, which
    # cancels the request on the workers (see Dispatcher).
    runner = web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    url = f"http://{args.host}:{args.port}"
    instance_id = f"gateway-{uuid.uuid4().hex[:8]}"
    admin = await start_admin(nc, subjects, "gateway", instance_id, admin_handlers(gateway, instance_id, url))
    # Until here a signal ends the process at once (nothing to drain yet); from now on it drains.
    stop = stop_event_on_signals()
    auth = "api key required" if api_keys.required else "open: no --api-key or PDSERVE_API_KEY, anyone who reaches the port may use it"
    log.info("gateway_started", url=url, model=args.model, instance=instance_id, auth=auth, sampling_defaults=generation.to_json())
    await stop.wait()
    log.info("gateway_stopping")
    await drain(gateway, args.drain_timeout)
    await bounded(admin.stop(), "admin stop")
    await bounded(runner.cleanup(), "http server stop")
    await bounded(dispatcher.stop(), "dispatcher stop")
    await close_nats(nc)
    return 0
