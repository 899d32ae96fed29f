"""`bench compare`: the same plan against each serving mode, side by side.

For each mode in turn: start `pdserve up` with the same total worker count → run the
plan (same seed, hence the identical schedule of arrivals, lengths and prompts) → stop the
stack. Then one table with each metric per mode and its ratio to the first mode (the
baseline), a combined plot (TTFT CDF and inter-token latency over time, one series per
mode), and one JSON file with every mode's full result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadtest.bench import Plan, Reporting, run_bench
from loadtest.client import Target
from loadtest.plots import save_compare_plot
from loadtest.prompts import PromptSource
from loadtest.report import write_json
from loadtest.stack import StackSpec, running_stack

# (result key, label)
COMPARED = (
    ("p50_ttft_ms", "P50 TTFT (ms)"),
    ("p99_ttft_ms", "P99 TTFT (ms)"),
    ("p50_itl_ms", "P50 inter-token latency (ms)"),
    ("p99_itl_ms", "P99 inter-token latency (ms)"),
    ("mean_tpot_ms", "Mean TPOT (ms)"),
    ("p50_e2el_ms", "P50 end-to-end latency (ms)"),
    ("request_throughput_per_worker", "Requests/s per worker"),
    ("output_throughput_per_worker", "Output tok/s per worker"),
)
COUNTS = (("completed", "Completed requests"), ("failed", "Failed requests"))


@dataclass(frozen=True)
class Comparison:
    modes: tuple[str, ...]
    model: str
    workers: int
    prefill_workers: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if len(self.modes) < 2 or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"need at least two distinct modes, got {list(self.modes)}")
        for mode in self.modes:
            self.stack(mode)  # validates mode and worker split

    def stack(self, mode: str) -> StackSpec:
        prefill = self.prefill_workers if mode == "disagg" else None
        return StackSpec(self.model, mode, self.workers, prefill, self.threads)


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """For every mode after the first: metric -> value / baseline value."""
    baseline_mode, *others = results
    base = results[baseline_mode]
    return {mode: {key: ratio(results[mode][key], base[key]) for key, _ in COMPARED} for mode in others}


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _ratio_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x ({(value - 1) * 100:+.0f}%)"


def format_table(comparison: Comparison, results: dict[str, dict]) -> str:
    modes = list(results)
    baseline = modes[0]
    header = ["metric", *modes, *(f"{m}/{baseline}" for m in modes[1:])]
    rows = [header]
    table_ratios = ratios(results)
    for key, label in COMPARED:
        rows.append([label, *(_cell(results[m][key]) for m in modes), *(_ratio_cell(table_ratios[m][key]) for m in modes[1:])])
    for key, label in COUNTS:
        rows.append([label, *(_cell(results[m][key]) for m in modes), *("" for _ in modes[1:])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    first = results[baseline]
    layouts = "; ".join(f"{m}: {comparison.stack(m).layout()}" for m in modes)
    title = (
        f"bench compare: {comparison.model}, {comparison.workers} workers each ({layouts}); "
        f"{first['workload']}, {first['load']}, {first['num_prompts']} requests, seed {first['seed']}"
    )
    return "\n".join([title, lines[0], "-" * len(lines[0]), *lines[1:]])


def run_compare(
    comparison: Comparison,
    plan: Plan,
    make_target: Callable[[str], Target],
    source: PromptSource,
    reporting: Reporting,
    out_dir: Path,
    ready_timeout_s: float = 600.0,
) -> dict:
    """Runs every mode; writes compare.json and compare.png under out_dir; returns the JSON dict."""
    reporting = dataclasses.replace(reporting, workers=comparison.workers)
    results: dict[str, dict] = {}
    for mode in comparison.modes:
        stack = comparison.stack(mode)
        print(f"bench compare: starting {mode} ({stack.layout()}) ...", file=sys.stderr, flush=True)
        api_key = secrets.token_urlsafe(16)  # each stack requires a key, as `pdserve up` does by default
        with running_stack(stack, out_dir / f"{mode}.stack.log", ready_timeout_s, api_key) as url:
            target = dataclasses.replace(make_target(url), api_key=api_key)
            results[mode] = asyncio.run(run_bench(target, plan, source, reporting))
    table = format_table(comparison, results)
    plot = save_compare_plot(results, out_dir / "compare.png")
    document = {
        "model_id": comparison.model,
        "workers": comparison.workers,
        "modes": list(comparison.modes),
        "layouts": {m: comparison.stack(m).layout() for m in comparison.modes},
        "baseline": comparison.modes[0],
        "ratios": ratios(results),
        "table": table,
        "plot": str(plot),
        "results": results,
    }
    write_json(out_dir / "compare.json", document)
    return document
