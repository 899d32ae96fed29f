"""`pdserve admin status|requests|drain|policy|loglevel|cancel`: operate a running deployment over NATS.

Without --nats, the NATS server of a `pdserve up` running on this machine is used, with
that stack's admin credentials; so is a --nats URL that belongs to such a stack, unless
--nats-creds says otherwise. Every command reaches NATS within --timeout or exits 1 with
one line naming the URL and the cause; --json outputs follow docs/admin.md (schemas in
services/admin/schemas/).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from pathlib import Path

from services.admin.client import AdminCallError, AdminSession
from services.admin.commands import BAD_ARGUMENT, COMMANDS, AdminFailure, print_failure
from services.admin.connection import NatsUnreachable, check_url, connect_admin
from shared import nats_auth
from shared.log import configure_logging
from shared.nats_failover import nats_urls_from
from shared.nats_permissions import NatsRole
from shared.stack_registry import running_stacks
from shared.subjects import Subjects

DEFAULT_TIMEOUT_S = 5.0
NO_DEPLOYMENT = "no deployment"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def register(admin: argparse.ArgumentParser) -> None:
    commands = admin.add_subparsers(dest="admin_command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--nats", metavar="URL", help="NATS URLs (default: $PDSERVE_NATS, else the one of a running `pdserve up`)")
        parser.add_argument("--prefix", default=None, help="NATS subject prefix (default: pd)")
        parser.add_argument("--json", action="store_true", help="print JSON (schemas: docs/admin.md)")
        parser.add_argument(
            "--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
            help=f"give up reaching NATS, or waiting for a service's answer, after this long (default {DEFAULT_TIMEOUT_S:g})",
        )  # fmt: skip
        nats_auth.add_arguments(parser, creds_help="admin credentials (default: those of the local `pdserve up` this URL belongs to)")
        return parser

    def watchable(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--watch", action="store_true", help="refresh until Ctrl-C (plain lines when not on a terminal)")
        parser.add_argument("--interval", type=_positive_seconds, default=2.0, metavar="SECONDS", help="--watch refresh period (default 2)")

    watchable(command("status", "workers, loads, KV use, queues, every service"))
    requests = command("requests", "requests in flight on every worker: phase, tokens, age, KV blocks")
    requests.add_argument("--worker", action="append", metavar="ID", help="only this worker (repeatable)")
    watchable(requests)
    drain = command("drain", "stop workers taking new work; follow them until they finished their requests and exited")
    drain.add_argument("workers", nargs="*", help="worker ids (see status)")
    drain.add_argument("--all", action="store_true", help="drain every worker")
    drain.add_argument(
        "--wait", type=_seconds, default=300.0, metavar="SECONDS",
        help="stop following after this long (the workers keep draining); 0: ask and return (default 300)",
    )  # fmt: skip
    policy = command("policy", "show or change the scheduler policy")
    policy.add_argument("--mode", choices=["disagg", "colocated", "auto"])
    policy.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="e.g. remote_min_prompt_tokens=512")
    loglevel = command("loglevel", "change log level at run time")
    loglevel.add_argument("level", choices=["debug", "info", "warning", "error"])
    loglevel.add_argument("instances", nargs="*", help="instance ids (default: every service)")
    cancel = command("cancel", "cancel a request everywhere it runs")
    cancel.add_argument("request_id")


def _target(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """(NATS URLs, prefix, admin credentials file or None)."""
    stacks = running_stacks()
    urls = nats_urls_from(args.nats)  # --nats, else $PDSERVE_NATS
    if urls:
        if problem := check_url(urls):
            raise AdminFailure(BAD_ARGUMENT, f"--nats: {problem}")
        local = next((s for s in stacks if s["nats_url"] == urls), {})
        return urls, args.prefix or local.get("prefix", "pd"), args.nats_creds or local.get("admin_creds")
    if not stacks:
        raise AdminFailure(NO_DEPLOYMENT, "no running `pdserve up` found on this machine; pass --nats URL")
    return stacks[0]["nats_url"], args.prefix or stacks[0]["prefix"], args.nats_creds or stacks[0].get("admin_creds")


def _connect_options(args: argparse.Namespace, subjects: Subjects, creds: str | None) -> dict:
    """Credentials and TLS for nats.connect (shared/nats_auth.py), as admin's role."""
    auth = dataclasses.replace(nats_auth.NatsAuth.from_args(args), creds=Path(creds) if creds else None)
    try:
        return auth.connect_options(subjects, NatsRole.ADMIN)
    except nats_auth.NatsCredentialsError as exc:  # names the flag
        raise AdminFailure(BAD_ARGUMENT, str(exc)) from None


async def _run(args: argparse.Namespace) -> int:
    url = None
    try:
        url, prefix, creds = _target(args)
        try:
            subjects = Subjects(prefix)
        except ValueError as exc:
            raise AdminFailure(BAD_ARGUMENT, f"--prefix: {exc}") from None
        nc = await connect_admin(url, args.timeout, _connect_options(args, subjects, creds))
        try:
            return await COMMANDS[args.admin_command](AdminSession(nc, url, subjects, args.timeout), args)
        finally:
            await _close(nc)
    except NatsUnreachable as exc:
        print_failure(args, exc.url, exc.cause, str(exc))
    except AdminCallError as exc:
        print_failure(args, url, exc.cause, str(exc))
    except AdminFailure as exc:
        print_failure(args, url, exc.cause, exc.message)
    return 1


async def _close(nc) -> None:
    try:
        await asyncio.wait_for(nc.close(), 1.0)
    except Exception:
        pass  # the server is gone already: nothing to flush


def run(args: argparse.Namespace) -> int:
    configure_logging("admin", "warning")
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:  # Ctrl-C outside --watch (which exits 0 by itself): no traceback
        return 130
