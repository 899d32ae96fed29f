"""The plan's PNG: TTFT (P50, P99) and mean TPOT against request rate, one series per mode.

Same house style as loadtest/plots.py: a `matplotlib.figure.Figure` on the Agg canvas, no
pyplot, read back from the JSON document alone (so a saved plan.json can be re-plotted).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_plan_plot(document: dict, path: Path) -> Path:
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    ttft_ax, tpot_ax = figure.subplots(1, 2)
    for mode, entry in document["modes"].items():
        points = [p for p in entry["curve"] if p["p50_ttft_ms"] is not None]
        rates = [p["request_rate"] for p in points]
        line = ttft_ax.plot(rates, [p["p50_ttft_ms"] for p in points], marker="o", label=f"{mode} P50")[0]
        ttft_ax.plot(rates, [p["p99_ttft_ms"] for p in points], marker="^", linestyle="--", color=line.get_color(), label=f"{mode} P99")
        tpot_ax.plot(rates, [p["mean_tpot_ms"] for p in points], marker="o", color=line.get_color(), label=f"{mode} mean")
    slo = document["slo"]
    ttft_ax.axhline(slo["ttft_ms"], color="grey", linewidth=1, linestyle=":", label="TTFT SLO")
    tpot_ax.axhline(slo["tpot_ms"], color="grey", linewidth=1, linestyle=":", label="TPOT SLO")
    ttft_ax.set_yscale("log")  # queues make TTFT grow by orders of magnitude near saturation
    tpot_ax.set_ylim(bottom=0)
    for ax, label in ((ttft_ax, "time to first token (ms)"), (tpot_ax, "time per output token (ms)")):
        ax.set_xlabel("request rate (req/s, whole deployment)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    model, hw = document["model"]["name"], document["hardware"]["name"]
    figure.suptitle(f"pdserve plan · {model} on {document['devices']} x {hw} · {document['workload']['name']}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)
    return path
