"""The result file (field names as in `vllm bench serve`) and the summary table.

Result JSON: run metadata (date, model_id, tokenizer_id, base_url, endpoint, workload,
load, num_prompts, request_rate, burstiness, max_concurrency, seed, goodput_slos),
`duration`, the summary of `metrics.summarize` (completed, failed, request_throughput,
output_throughput, mean/median/std/p50/p90/p99 of ttft, tpot, itl and e2el in ms, ...),
and per-request arrays in schedule order, failed requests included: input_lens,
output_lens (0 when failed), requested_output_lens, start_times, ttfts, e2els (seconds),
itls (a list of gaps per request, seconds) and errors ("" on success).
"""

from __future__ import annotations

import collections
import json
import math
from datetime import datetime
from pathlib import Path

from loadtest.runner import RunResult


def json_number(value: float) -> float | str:
    """JSON has no infinity: an unbounded rate is written as the string "inf", as vllm prints it."""
    return "inf" if math.isinf(value) else value


def result_json(info: dict, run: RunResult, summary: dict) -> dict:
    outcomes = run.outcomes
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai",
        **info,
        "duration": run.duration_s,
        **summary,
        "input_lens": [o.input_len for o in outcomes],
        "output_lens": [o.output_len for o in outcomes],
        "requested_output_lens": [o.requested_output_len for o in outcomes],
        "start_times": [o.start_s for o in outcomes],
        "ttfts": [o.ttft_s for o in outcomes],
        "itls": [o.itls_s for o in outcomes],
        "e2els": [o.e2el_s for o in outcomes],
        "errors": [o.error for o in outcomes],
    }


def write_json(path: Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")


_RULE_WIDTH = 50
_SECTIONS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


def _row(label: str, value) -> str:
    if value is None:
        text = "n/a"
    elif isinstance(value, float):
        text = f"{value:.2f}"
    else:
        text = str(value)
    return f"{label:<40} {text:>9}"


def _error_lines(errors: list[str], limit: int = 5) -> list[str]:
    counts = collections.Counter(e for e in errors if e)
    return [f"  {n}x {error[:120]}" for error, n in counts.most_common(limit)]


def format_summary(result: dict) -> str:
    workers = result["workers"]
    lines = [
        " Serving Benchmark Result ".center(_RULE_WIDTH, "="),
        _row("Successful requests:", result["completed"]),
        _row("Failed requests:", result["failed"]),
        _row("Benchmark duration (s):", result["duration"]),
        _row("Total input tokens:", result["total_input_tokens"]),
        _row("Total generated tokens:", result["total_output_tokens"]),
        _row("Request throughput (req/s):", result["request_throughput"]),
        _row("Output token throughput (tok/s):", result["output_throughput"]),
        _row("Total token throughput (tok/s):", result["total_token_throughput"]),
        _row(f"Request throughput per worker (/{workers}):", result["request_throughput_per_worker"]),
        _row(f"Output tok/s per worker (/{workers}):", result["output_throughput_per_worker"]),
    ]
    if result.get("request_goodput") is not None:
        slos = " ".join(f"{k}<={v:g}ms" for k, v in result["goodput_slos"].items())
        lines.append(_row(f"Request goodput (req/s, {slos}):", result["request_goodput"]))
    for key, short, title in _SECTIONS:
        lines.append(f" {title} ".center(_RULE_WIDTH, "-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            lines.append(_row(f"{label} {short} (ms):", result[f"{stat}_{key}_ms"]))
    lines.append("=" * _RULE_WIDTH)
    if result["failed"]:
        lines += ["Errors (most common):", *_error_lines(result["errors"])]
    if any(o and o != r for o, r in zip(result["output_lens"], result["requested_output_lens"])):
        lines.append("Note: some completed requests returned fewer/more tokens than max_tokens (server ignored ignore_eos?)")
    return "\n".join(lines)
