"""`pdserve admin status`: one snapshot of every service and worker, rates between two, and its text forms.

A snapshot asks every discovered service for its `status` at once, takes the workers as
the scheduler sees them (heartbeats: load, KV use, queues) and joins each with the
worker's own answer (requests in its request table, token totals). Rates need two snapshots: `--watch`
passes the previous one to `with_rates`.
"""

from __future__ import annotations

import asyncio
import time

from services.admin.client import AdminCallError, AdminSession

# What a worker's own `status` adds to what the scheduler knows from its heartbeats: its field -> ours.
WORKER_OWN_FIELDS = {
    "requests": "in_flight", "generated_tokens_total": "generated_tokens_total", "prompt_tokens_total": "prompt_tokens_total",
    "ranks": "ranks",  # one row per rank process of the worker's group
}  # fmt: skip


async def take_status(session: AdminSession) -> dict:
    services = await session.discover()
    answers = await asyncio.gather(*(_status_of(session, s["metadata"]["instance"]) for s in services))
    report: dict = {"time": time.time(), "services": [], "workers": [], "policy": None}
    for service, answer in zip(services, answers):
        meta = service["metadata"]
        entry = {"kind": meta["kind"], "instance": meta["instance"], "name": service["name"], "id": service["id"], **answer}
        report["services"].append(entry)
        if entry["kind"] == "scheduler" and "status" in entry and report["policy"] is None:
            report["policy"] = entry["status"]["policy"]
            report["workers"] = [dict(w) for w in entry["status"]["workers"]]
    own = {s["instance"]: s["status"] for s in report["services"] if s["kind"] == "worker" and "status" in s}
    for worker in report["workers"]:
        mine = own.get(worker["worker_id"], {})
        worker.update({ours: mine[theirs] for theirs, ours in WORKER_OWN_FIELDS.items() if theirs in mine})
    return report


async def _status_of(session: AdminSession, instance: str) -> dict:
    try:
        return {"status": await session.call(instance, "status")}
    except AdminCallError as exc:
        return {"error": str(exc)}


def with_rates(report: dict, previous: dict | None) -> dict:
    """Adds per-worker token rates from the previous snapshot (same worker, counters not reset)."""
    if previous is None:
        return report
    seconds = report["time"] - previous["time"]
    before = {w["worker_id"]: w for w in previous["workers"]}
    for worker in report["workers"]:
        earlier = before.get(worker["worker_id"])
        if seconds <= 0 or earlier is None:
            continue
        rates = {}
        for total, rate in (("generated_tokens_total", "generated_tokens_per_s"), ("prompt_tokens_total", "prompt_tokens_per_s")):
            if total in worker and total in earlier and worker[total] >= earlier[total]:
                rates[rate] = round((worker[total] - earlier[total]) / seconds, 1)
        if len(rates) == 2:
            worker["rates"] = rates
    return report


def service_state(service: dict) -> str:
    if "error" in service:
        return service["error"]
    return "draining" if service["status"].get("draining") else "ok"


def _rate(worker: dict, name: str) -> str:
    return f"{worker['rates'][name]:.1f}" if "rates" in worker else "-"


TOKEN_COLUMNS = f"{'queued prefill':>14} {'gen tok/s':>9} {'prompt tok/s':>12}"


def status_lines(report: dict) -> list[str]:
    """The table `status` prints (and `--watch` redraws on a terminal)."""
    lines = [f"{'service':<10} {'instance':<22} state"]
    lines += [f"{s['kind']:<10} {s['instance']:<22} {service_state(s)}" for s in report["services"]]
    if report["policy"]:
        lines += ["", f"policy: mode={report['policy']['mode']}"]
    lines += ["", f"{'worker':<22} {'role':<8} {'running':>7} {'waiting':>7} {'in flight':>9} {'kv used':>12} " + TOKEN_COLUMNS]
    for w in report["workers"]:
        kv = f"{w['kv_blocks_used']}/{w['kv_blocks_total']}"
        in_flight = w.get("in_flight", "-")
        state = "  draining" if w["draining"] else ""
        lines.append(
            f"{w['worker_id']:<22} {w['role']:<8} {w['running']:>7} {w['waiting']:>7} {in_flight:>9} {kv:>12} "
            f"{w.get('queued_prefill_tokens', 0):>14} {_rate(w, 'generated_tokens_per_s'):>9} {_rate(w, 'prompt_tokens_per_s'):>12}{state}"
        )
    if not report["workers"]:
        lines.append("(no workers)" if report["policy"] is not None else "(no scheduler answered: workers unknown)")
    return lines + rank_lines(report)


def rank_lines(report: dict) -> list[str]:
    """Every worker's rank processes: where each runs, its KV blocks and what it moved over UCX."""
    rows = [(w["worker_id"], rank) for w in report["workers"] for rank in w.get("ranks", [])]
    if not rows:
        return []
    lines = ["", f"{'rank':<24} {'pid':>8} {'host':<16} {'device':<8} {'dp':>3} {'kv used':>8} {'ucx sent':>10} {'ucx recv':>10}"]
    for worker_id, rank in rows:
        moved = (
            f"{_size(rank['ucx_bytes_sent']):>10} {_size(rank['ucx_bytes_received']):>10}" if "error" not in rank else f"  {rank['error']}"
        )
        lines.append(
            f"{worker_id + '/' + str(rank['rank']):<24} {rank['pid']:>8} {rank['host']:<16} {rank['device']:<8} "
            f"{rank['dp_group']:>3} {rank['kv_blocks_used']:>8} {moved}"
        )
    return lines


def _size(nbytes: int) -> str:
    size, unit = float(nbytes), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


def status_plain_lines(report: dict) -> list[str]:
    """One snapshot as self-contained lines (for logs and pipes): time, then key=value per worker."""
    stamp = time.strftime("%H:%M:%S", time.localtime(report["time"]))
    if not report["workers"]:
        return [f"{stamp} no workers ({len(report['services'])} services)"]
    lines = []
    for w in report["workers"]:
        fields = [
            f"role={w['role']}", f"running={w['running']}", f"waiting={w['waiting']}", f"in_flight={w.get('in_flight', '-')}",
            f"kv={w['kv_blocks_used']}/{w['kv_blocks_total']}", f"queued_prefill={w.get('queued_prefill_tokens', 0)}",
            f"gen_tok/s={_rate(w, 'generated_tokens_per_s')}", f"prompt_tok/s={_rate(w, 'prompt_tokens_per_s')}",
        ]
        lines.append(f"{stamp} {w['worker_id']} " + " ".join(fields) + (" draining" if w["draining"] else ""))
    return lines
