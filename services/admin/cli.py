"""`pdserve admin status|drain|policy|loglevel|cancel`: operate a running deployment over NATS.

Without --nats, the NATS server of a `pdserve up` running on this machine is used, with
that stack's admin credentials; so is a --nats URL that belongs to such a stack, unless
--nats-creds says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from services.admin.client import AdminCallError, call, discover
from shared import nats_auth
from shared.log import configure_logging
from shared.nats_permissions import NatsRole
from shared.runtime import close_nats, connect_nats
from shared.stack_registry import running_stacks
from shared.subjects import Subjects


def register(admin: argparse.ArgumentParser) -> None:
    commands = admin.add_subparsers(dest="admin_command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--nats", metavar="URL", help="NATS URL (default: the one of a running `pdserve up`)")
        parser.add_argument("--prefix", default=None, help="NATS subject prefix (default: pd)")
        parser.add_argument("--json", action="store_true", help="print JSON")
        nats_auth.add_arguments(parser, creds_help="admin credentials (default: those of the local `pdserve up` this URL belongs to)")
        return parser

    command("status", "workers, loads, KV use, sessions in flight, every service")
    drain = command("drain", "stop workers taking new work; they finish in-flight requests, then exit")
    drain.add_argument("workers", nargs="*", help="worker ids (see status)")
    drain.add_argument("--all", action="store_true", help="drain every worker")
    policy = command("policy", "show or change the scheduler policy")
    policy.add_argument("--mode", choices=["disagg", "colocated", "auto"])
    policy.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="e.g. remote_min_prompt_tokens=512")
    loglevel = command("loglevel", "change log level at run time")
    loglevel.add_argument("level", choices=["debug", "info", "warning", "error"])
    loglevel.add_argument("instances", nargs="*", help="instance ids (default: every service)")
    cancel = command("cancel", "cancel a request everywhere it runs")
    cancel.add_argument("request_id")


def _target(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """(NATS URL, prefix, admin credentials file or None)."""
    stacks = running_stacks()
    if args.nats:
        local = next((s for s in stacks if s["nats_url"] == args.nats), {})
        return args.nats, args.prefix or local.get("prefix", "pd"), args.nats_creds or local.get("admin_creds")
    if not stacks:
        raise SystemExit("pdserve admin: no running `pdserve up` found on this machine; pass --nats URL")
    return stacks[0]["nats_url"], args.prefix or stacks[0]["prefix"], args.nats_creds or stacks[0].get("admin_creds")


def _settings(pairs: list[str]) -> dict:
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"pdserve admin policy: {pair!r} is not KEY=VALUE")
        changes[key] = value
    return changes


async def _status(nc, subjects: Subjects, services: list[dict]) -> dict:
    report = {"services": [], "workers": [], "policy": None}
    for service in services:
        instance = service["metadata"]["instance"]
        entry = {"kind": service["metadata"]["kind"], "instance": instance, "name": service["name"], "id": service["id"]}
        try:
            entry["status"] = await call(nc, subjects, instance, "status")
        except AdminCallError as exc:
            entry["error"] = str(exc)
        report["services"].append(entry)
        if entry["kind"] == "scheduler" and "status" in entry and report["policy"] is None:
            report["policy"] = entry["status"]["policy"]
            report["workers"] = entry["status"]["workers"]
    return report


def _print_status(report: dict) -> None:
    print(f"{'service':<10} {'instance':<22} state")
    for s in report["services"]:
        state = s.get("error") or ("draining" if s["status"].get("draining") else "ok")
        print(f"{s['kind']:<10} {s['instance']:<22} {state}")
    if report["policy"]:
        print(f"\npolicy: mode={report['policy']['mode']}")
    print(f"\n{'worker':<22} {'role':<8} {'running':>7} {'waiting':>7} {'kv used':>12} {'queued prefill':>14}")
    for w in report["workers"]:
        kv = f"{w['kv_blocks_used']}/{w['kv_blocks_total']}"
        print(f"{w['worker_id']:<22} {w['role']:<8} {w['running']:>7} {w['waiting']:>7} {kv:>12} {w['queued_prefill_tokens']:>14}")


async def _run(args: argparse.Namespace) -> int:
    configure_logging("admin", "warning")
    url, prefix, creds = _target(args)
    subjects = Subjects(prefix)
    auth = dataclasses.replace(nats_auth.NatsAuth.from_args(args), creds=Path(creds) if creds else None)
    options = auth.connect_options(subjects, NatsRole.ADMIN)
    nc = await connect_nats(url, "pd-admin", first_connect_timeout=3.0, options=options)
    try:
        services = await discover(nc, prefix)
        by_kind = lambda kind: [s["metadata"]["instance"] for s in services if s["metadata"]["kind"] == kind]  # noqa: E731
        command = args.admin_command
        if command == "status":
            result = await _status(nc, subjects, services)
            if not args.json:
                _print_status(result)
                return 0
        elif command == "drain":
            targets = by_kind("worker") if args.all else args.workers
            if not targets:
                raise SystemExit("pdserve admin drain: name worker ids, or pass --all")
            result = {t: await call(nc, subjects, t, "drain") for t in targets}
        elif command == "policy":
            changes = _settings(args.settings) | ({"mode": args.mode} if args.mode else {})
            schedulers = by_kind("scheduler")
            if not schedulers:
                raise SystemExit("pdserve admin policy: no scheduler is running")
            # Every scheduler applies the change, so placement stays consistent across them.
            result = {s: await call(nc, subjects, s, "policy", {"set": changes}) for s in schedulers}
        elif command == "loglevel":
            targets = args.instances or [s["metadata"]["instance"] for s in services]
            result = {t: await call(nc, subjects, t, "loglevel", {"level": args.level}) for t in targets}
        else:  # cancel
            targets = by_kind("gateway") + by_kind("worker")
            result = {t: await call(nc, subjects, t, "cancel", {"request_id": args.request_id}) for t in targets}
        print(json.dumps(result, indent=None if args.json else 2))
        return 0
    except AdminCallError as exc:
        print(f"pdserve admin {args.admin_command}: {exc}", file=sys.stderr)
        return 1
    finally:
        await close_nats(nc, timeout=1.0)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
