"""What each `pdserve admin` command does once connected: ask services, print text or versioned JSON.

Each returns the exit status. Failures that end a command raise `AdminFailure` (one
line; an error object with --json); a command that reaches several services reports each
one's answer and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from services.admin.client import SERVICE_ERROR, AdminCallError, AdminSession
from services.admin.drain import DrainOutcome, DrainReport, drain_worker, progress_line
from services.admin.requests import requests_lines, requests_plain_lines, take_requests
from services.admin.schema import versioned
from services.admin.status import status_lines, status_plain_lines, take_status, with_rates
from services.admin.watch import presenter, stop_on_signals, watch

BAD_ARGUMENT = "bad argument"


class AdminFailure(Exception):
    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause
        self.message = message


def emit(args: argparse.Namespace, payload: dict, lines: list[str]) -> None:
    print(json.dumps(versioned(payload)) if args.json else "\n".join(lines))


async def status(session: AdminSession, args: argparse.Namespace) -> int:
    if not args.watch:
        report = await take_status(session)
        emit(args, report, status_lines(report))
        return 0
    previous: list[dict] = []

    async def snapshot() -> dict:
        report = with_rates(await take_status(session), previous[-1] if previous else None)
        previous[:] = [report]
        return report

    show = presenter(args.json, f"pdserve admin status --watch (every {args.interval:g} s)", status_lines, status_plain_lines, versioned)
    await watch(snapshot, show, args.interval, stop_on_signals())
    return 0


async def requests(session: AdminSession, args: argparse.Namespace) -> int:
    if not args.watch:
        report = await take_requests(session, args.worker)
        emit(args, report, requests_lines(report))
        return 1 if report["errors"] else 0
    show = presenter(args.json, f"pdserve admin requests --watch (every {args.interval:g} s)", requests_lines, requests_plain_lines, versioned)
    await watch(lambda: take_requests(session, args.worker), show, args.interval, stop_on_signals())
    return 0


async def drain(session: AdminSession, args: argparse.Namespace) -> int:
    targets = await session.instances("worker") if args.all else args.workers
    if not targets:
        raise AdminFailure(BAD_ARGUMENT, "name worker ids (see `pdserve admin status`), or pass --all")

    def show_progress(report: DrainReport) -> None:
        if not args.json:
            print(progress_line(report), flush=True)

    async def follow(worker_id: str) -> DrainReport:
        report = await drain_worker(session, worker_id, args.wait, show_progress)
        if not args.json:
            print(report.message, flush=True)  # as each ends, not when the slowest does
        return report

    reports = await asyncio.gather(*(follow(worker_id) for worker_id in targets))
    if args.json:
        print(json.dumps(versioned({"workers": [r.to_json() for r in reports]})))
    return 0 if all(r.outcome in (DrainOutcome.DRAINED, DrainOutcome.DRAINING) for r in reports) else 1


def _settings(pairs: list[str]) -> dict:
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise AdminFailure(BAD_ARGUMENT, f"{pair!r} is not KEY=VALUE")
        changes[key] = value
    return changes


async def policy(session: AdminSession, args: argparse.Namespace) -> int:
    changes = _settings(args.settings) | ({"mode": args.mode} if args.mode else {})
    schedulers = await session.instances("scheduler")
    if not schedulers:
        raise AdminFailure(SERVICE_ERROR, "no scheduler is running")
    # Every scheduler applies the change, so placement stays consistent across them.
    try:
        replies = [{"instance": s, "policy": await session.call(s, "policy", {"set": changes})} for s in schedulers]
    except AdminCallError as exc:
        raise AdminFailure(exc.cause, str(exc)) from None
    lines = [f"{r['instance']}: " + " ".join(f"{k}={v}" for k, v in r["policy"].items()) for r in replies]
    emit(args, {"schedulers": replies}, lines)
    return 0


async def _each(session: AdminSession, instances: list[str], endpoint: str, body: dict) -> list[tuple[str, dict | str]]:
    async def one(instance: str) -> tuple[str, dict | str]:
        try:
            return instance, await session.call(instance, endpoint, body)
        except AdminCallError as exc:
            return instance, str(exc)

    return list(await asyncio.gather(*(one(i) for i in instances)))


async def loglevel(session: AdminSession, args: argparse.Namespace) -> int:
    targets = args.instances or [s["metadata"]["instance"] for s in await session.discover()]
    answers = await _each(session, targets, "loglevel", {"level": args.level})
    entries = [{"instance": i, "error": a} if isinstance(a, str) else {"instance": i, "level": a["level"]} for i, a in answers]
    emit(args, {"level": args.level, "services": entries}, [f"{e['instance']}: {e.get('level') or e['error']}" for e in entries])
    return 1 if any("error" in e for e in entries) else 0


async def cancel(session: AdminSession, args: argparse.Namespace) -> int:
    services = await session.discover()
    targets = [s["metadata"]["instance"] for s in services if s["metadata"]["kind"] in ("gateway", "worker")]
    answers = await _each(session, targets, "cancel", {"request_id": args.request_id})
    entries = [{"instance": i, "error": a} if isinstance(a, str) else {"instance": i, "held": bool(a["held"])} for i, a in answers]
    held_by = [e["instance"] for e in entries if e.get("held")]
    lines = [f"{args.request_id} cancelled on {', '.join(held_by)}" if held_by else f"no service held {args.request_id}"]
    lines += [f"{e['instance']}: {e['error']}" for e in entries if "error" in e]
    emit(args, {"request_id": args.request_id, "held_by": held_by, "services": entries}, lines)
    return 1 if any("error" in e for e in entries) else 0


COMMANDS = {"status": status, "requests": requests, "drain": drain, "policy": policy, "loglevel": loglevel, "cancel": cancel}


def print_failure(args: argparse.Namespace, url: str | None, cause: str, message: str) -> None:
    line = f"pdserve admin {args.admin_command}: {message}"
    if args.json:
        print(json.dumps(versioned({"error": {"url": url, "cause": cause, "message": line}})))
    print(line, file=sys.stderr)
