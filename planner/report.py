"""The plan as JSON (stable keys for scripts) and as a table for people.

JSON: {"recommendation": "disagg" | "colocated", "modes": {mode: {p50_ttft_ms, p99_ttft_ms,
mean_tpot_ms, p99_itl_ms, output_throughput_per_device, goodput_per_device, devices, layout,
...; disagg also "prefill" and "decode": {devices, layout, instances, step_tokens}}}, the
model, hardware, workload, load, SLOs, what was searched, the curves and the policy command}.
"""

from __future__ import annotations

from planner.deployment import Deployment, Pool
from planner.metrics import ATTAINMENT, Summary
from planner.plan import RECOMMEND_MARGIN, ModeOutcome, PlanOutcome
from services.scheduler.policy import Mode
from shared.protocol import Role

# (summary key, label); the first six are the keys the issue fixes.
MODE_METRICS = (
    ("p50_ttft_ms", "P50 TTFT (ms)"),
    ("p99_ttft_ms", "P99 TTFT (ms)"),
    ("mean_tpot_ms", "Mean TPOT (ms)"),
    ("p99_itl_ms", "P99 inter-token latency (ms)"),
    ("output_throughput_per_device", "Output tok/s per device"),
    ("goodput_per_device", "Goodput per device (req/s)"),
)


def _pool(pool: Pool) -> dict:
    return {"devices": pool.devices, "layout": pool.layout.describe(), "instances": pool.count, "step_tokens": pool.step_tokens}


def _deployment(deployment: Deployment) -> dict:
    if deployment.mode is Mode.COLOCATED:
        pool = deployment.pool(Role.BOTH)
        return {"devices": pool.devices, "layout": pool.layout.describe(), "instances": pool.count, "step_tokens": pool.step_tokens}
    return {
        "devices": deployment.devices,
        "layout": f"prefill {deployment.pool(Role.PREFILL).layout.describe()}; decode {deployment.pool(Role.DECODE).layout.describe()}",
        "prefill": _pool(deployment.pool(Role.PREFILL)),
        "decode": _pool(deployment.pool(Role.DECODE)),
    }


def _summary(summary: Summary) -> dict:
    return {k: v for k, v in summary.as_dict().items() if k not in ("attainment",)} | {"slo_attainment": summary.attainment}


def mode_json(outcome: ModeOutcome) -> dict:
    winner = outcome.winner
    return {
        **{key: getattr(outcome.at_load, key) for key, _ in MODE_METRICS if key != "goodput_per_device"},
        "goodput_per_device": winner.per_device,
        "goodput": winner.goodput.rate,
        **_deployment(winner.deployment),
        "deployment": winner.deployment.describe(),
        "at_load": _summary(outcome.at_load),
        "searched": [{"deployment": e.deployment.describe(), "capacity": e.capacity, "goodput": e.goodput.rate,
                      "goodput_per_device": e.per_device} for e in outcome.simulated],
        "curve": [{"request_rate": rate, "p50_ttft_ms": s.p50_ttft_ms, "p99_ttft_ms": s.p99_ttft_ms,
                   "mean_tpot_ms": s.mean_tpot_ms, "slo_attainment": s.attainment} for rate, s in outcome.curve],
    }


def plan_json(outcome: PlanOutcome, policy_command: str | None = None) -> dict:
    scenario = outcome.scenario
    mean_in, mean_out = scenario.source.mean_lengths()
    document = {
        "recommendation": outcome.recommendation.value,
        "modes": {mode.value: mode_json(o) for mode, o in outcome.modes.items()},
        "model": scenario.model.as_dict(scenario.hardware.kv_bytes),
        "hardware": scenario.hardware.as_dict() | {
            "by_mode": {mode.value: hw.as_dict() for mode, hw in scenario.mode_hardware.items()}},
        "devices": scenario.devices,
        "workload": {"name": scenario.source.name, "mean_input_len": mean_in, "mean_output_len": mean_out, "seed": scenario.source.seed},
        "load": {"request_rate": outcome.load_rate, "description": outcome.load_text},
        "slo": scenario.slo.as_dict() | {"attainment": ATTAINMENT},
        "recommend_margin": RECOMMEND_MARGIN,
    }
    if policy_command is not None:
        document["policy_command"] = policy_command
    return document


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _ratio(value, base) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}x ({(value / base - 1) * 100:+.0f}%)"


def format_plan(document: dict) -> str:
    modes = document["modes"]
    names = list(modes)
    model, hw, slo = document["model"], document["hardware"], document["slo"]
    lines = [
        f"pdserve plan: {model['name']} ({model['params'] / 1e9:.3g}B params, {model['active_params'] / 1e9:.3g}B active, "
        f"{model['kv_bytes_per_token'] / 1024:.1f} KiB KV/token) on {document['devices']} x {hw['name']}",
        f"workload {document['workload']['name']} (mean {document['workload']['mean_input_len']:.0f} in / "
        f"{document['workload']['mean_output_len']:.0f} out); load: {document['load']['description']}",
        f"SLOs: TTFT <= {slo['ttft_ms']:.4g} ms, TPOT <= {slo['tpot_ms']:.4g} ms for {slo['attainment']:.0%} of requests (goodput)",
        "",
    ]
    header = ["metric", *names] + (["disagg/colocated"] if names == ["colocated", "disagg"] else [])
    rows = [header]
    for key, label in MODE_METRICS:
        row = [label, *(_cell(modes[m][key]) for m in names)]
        if len(header) > len(names) + 1:
            row.append(_ratio(modes["disagg"][key], modes["colocated"][key]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    table = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines += [table[0], "-" * len(table[0]), *table[1:], ""]
    for name in names:
        mode = modes[name]
        lines.append(f"{name}: {mode['deployment']} = {mode['devices']} devices, goodput {mode['goodput']:.3g} req/s")
        for entry in mode["searched"]:
            lines.append(f"    searched: {entry['deployment']}: capacity {entry['capacity']:.3g}, goodput {entry['goodput']:.3g} req/s")
    lines.append("")
    lines.append(_recommendation_line(document))
    if "policy_command" in document:
        lines.append(f"policy: {document['policy_command']}")
    return "\n".join(lines)


def _recommendation_line(document: dict) -> str:
    modes = document["modes"]
    if set(modes) != {"colocated", "disagg"}:
        return f"recommendation: {document['recommendation']} (only mode planned)"
    d, c = modes["disagg"]["goodput_per_device"], modes["colocated"]["goodput_per_device"]
    gain = f"{(d / c - 1) * 100:+.0f}%" if c else "n/a"
    margin = f"{document['recommend_margin']:.0%}"
    return f"recommendation: {document['recommendation']} (disagg goodput per device {gain} vs colocated; disaggregate at >= +{margin})"
