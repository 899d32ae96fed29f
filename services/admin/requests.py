"""`pdserve admin requests`: the requests in flight on every worker, from their request tables.

Each worker answers its admin endpoint `requests` with
`{"instance": ID, "requests": [{"request_id", "phase", "rank"?, "prompt_tokens",
"generated_tokens", "age_s", "kv_blocks"}]}` (docs/admin.md). Admin asks every worker at
once, tags each row with its worker, and lists workers that did not answer separately,
so one stuck worker does not hide the others' requests.
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
            report["requests"] += [_row(worker_id, entry) for entry in answer["requests"]]
        except (KeyError, TypeError) as exc:  # a worker speaking another contract: say so, keep the others
            report["errors"].append({"instance": worker_id, "message": f"malformed requests reply (missing {exc})"})
    report["requests"].sort(key=lambda r: (r["worker_id"], r.get("rank", 0), -r["age_s"]))
    return report


async def _requests_of(session: AdminSession, worker_id: str) -> dict | str:
    try:
        return await session.call(worker_id, "requests")
    except AdminCallError as exc:
        return str(exc)


def _row(worker_id: str, entry: dict) -> dict:
    row = {"worker_id": worker_id, **{field: entry[field] for field in ROW_FIELDS}}
    if "rank" in entry:
        row["rank"] = entry["rank"]
    return row


def _where(row: dict) -> str:
    return f"{row['worker_id']}/{row['rank']}" if "rank" in row else row["worker_id"]


def requests_lines(report: dict) -> list[str]:
    lines = [f"{'request':<34} {'worker/rank':<18} {'phase':<12} {'prompt':>7} {'generated':>9} {'age s':>7} {'kv blocks':>9}"]
    for r in report["requests"]:
        lines.append(
            f"{r['request_id']:<34} {_where(r):<18} {r['phase']:<12} {r['prompt_tokens']:>7} {r['generated_tokens']:>9} "
            f"{r['age_s']:>7.1f} {r['kv_blocks']:>9}"
        )
    if not report["requests"]:
        lines.append("(no requests in flight)")
    lines += [f"{e['instance']}: {e['message']}" for e in report["errors"]]
    return lines


def requests_plain_lines(report: dict) -> list[str]:
    stamp = time.strftime("%H:%M:%S", time.localtime(report["time"]))
    lines = [
        f"{stamp} {r['request_id']} worker={_where(r)} phase={r['phase']} prompt={r['prompt_tokens']} "
        f"generated={r['generated_tokens']} age_s={r['age_s']:.1f} kv_blocks={r['kv_blocks']}"
        for r in report["requests"]
    ]
    if not report["requests"]:
        lines.append(f"{stamp} no requests in flight")
    lines += [f"{stamp} {e['instance']}: {e['message']}" for e in report["errors"]]
    return lines
