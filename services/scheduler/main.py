"""`pdserve scheduler`."""

from __future__ import annotations

import argparse
import uuid

from services.scheduler.policy import Mode, Policy
from services.scheduler.service import SchedulerService
from shared.log import configure_logging
from shared.nats_auth import connect_options_for
from shared.nats_permissions import NatsRole
from shared.runtime import close_nats, connect_nats, stop_event_on_signals
from shared.shutdown import bounded
from shared.subjects import Subjects


async def run(args: argparse.Namespace) -> int:
    log = configure_logging("scheduler", args.log_level)
    try:
        policy = Policy(mode=Mode.parse(args.mode))
    except ValueError as exc:
        raise SystemExit(f"pdserve scheduler: --mode: {exc}") from None
    nc = await connect_nats(args.nats, "pd-scheduler", options=connect_options_for(args, NatsRole.SCHEDULER))
    instance_id = f"scheduler-{uuid.uuid4().hex[:8]}"
    service = SchedulerService(nc, Subjects(args.prefix), policy, instance_id)
    await service.start()
    stop = stop_event_on_signals()  # before this, a signal ends the process at once
    await stop.wait()
    log.info("scheduler_stopping")
    await bounded(service.stop(), "scheduler stop")
    await close_nats(nc)
    return 0
