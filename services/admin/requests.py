"""`pdserve admin requests`: the requests in flight on every worker, from their request tables.

Each worker answers its admin endpoint `requests` with `{"instance": ID, "ranks": N,
"requests": [{"request_id", "phase", "path", "prompt_tokens", "generated_tokens", "age_s",
"kv_blocks", "rank"?}]}` (docs/admin.md; services/worker/service.py `_requests`). Admin asks
every worker at once, tags each row with its worker (and the instance's rank count), and
lists workers that did not answer separately, so one stuck worker does not hide the
others' requests.
"""

from __future__ import annotations

import asyncio
import time

from services.admin.client import AdminCallError, AdminSession

ROW_FIELDS = ("request_id", "phase", "prompt_tokens", "generated_tokens", "age_s", "kv_blocks")


async def take_requests(session: AdminSession, worker_ids: list[str] | None = None) -> dict:
    workers = worker_ids or await session.instances("worker")
    answers = await asyncio.gather(*(_requests_of(session, worker_id) for worker_id in workers))
    report: dict = {"time": time.time(), "requests": [], "errors": []}
    for worker_id, answer in zip(workers, answers):
        if isinstance(answer, str):
            report["errors"].append({"instance": worker_id, "message": answer})
            continue
        try:
            report["requests"] += [_row(worker_id, answer.get("ranks", 1), entry) for entry in answer["requests"]]
        except (KeyError, TypeError) as exc:  # a worker speaking another contract: say so, keep the others
            report["errors"].append({"instance": worker_id, "message": f"malformed requests reply (missing {exc})"})
    report["requests"].sort(key=lambda r: (r["worker_id"], r.get("rank", 0), -r["age_s"]))
    return report


async def _requests_of(session: AdminSession, worker_id: str) -> dict | str:
    try:
        return await session.call(worker_id, "requests")
    except AdminCallError as exc:
        return str(exc)


OPTIONAL_FIELDS = ("path", "rank")


def _row(worker_id: str, ranks: int, entry: dict) -> dict:
    row = {"worker_id": worker_id, "ranks": ranks, **{field: entry[field] for field in ROW_FIELDS}}
    return row | {field: entry[field] for field in OPTIONAL_FIELDS if field in entry}


def _where(row: dict) -> str:
    """decode-0 (one rank), decode-0/2 (on rank 2), decode-0/0-3 (across ranks 0 to 3)."""
    if "rank" in row:
        return f"{row['worker_id']}/{row['rank']}"
    return f"{row['worker_id']}/0-{row['ranks'] - 1}" if row["ranks"] > 1 else row["worker_id"]


def requests_lines(report: dict) -> list[str]:
    width = max([len("request"), *(len(r["request_id"]) for r in report["requests"])])
    lines = [f"{'request':<{width}} {'worker/rank':<14} {'path':<9} {'phase':<12} {'prompt':>7} {'generated':>9} {'age s':>7} {'kv blocks':>9}"]
    for r in report["requests"]:
        lines.append(
            f"{r['request_id']:<{width}} {_where(r):<14} {r.get('path', '-'):<9} {r['phase']:<12} {r['prompt_tokens']:>7} "
            f"{r['generated_tokens']:>9} {r['age_s']:>7.1f} {r['kv_blocks']:>9}"
        )
    if not report["requests"]:
        lines.append("(no requests in flight)")
    lines += [f"{e['instance']}: {e['message']}" for e in report["errors"]]
    return lines


def requests_plain_lines(report: dict) -> list[str]:
    stamp = time.strftime("%H:%M:%S", time.localtime(report["time"]))
    lines = [
        f"{stamp} {r['request_id']} worker={_where(r)} path={r.get('path', '-')} phase={r['phase']} prompt={r['prompt_tokens']} "
        f"generated={r['generated_tokens']} age_s={r['age_s']:.1f} kv_blocks={r['kv_blocks']}"
        for r in report["requests"]
    ]
    if not report["requests"]:
        lines.append(f"{stamp} no requests in flight")
    lines += [f"{stamp} {e['instance']}: {e['message']}" for e in report["errors"]]
    return lines
