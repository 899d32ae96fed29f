"""PNG plots from result dicts: TTFT CDF and inter-token latency over time.

Built on `matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global backend
state, no display needed. Everything is read back from the result JSON fields, so a saved
result file can be re-plotted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _ok(result: dict) -> list[int]:
    return [i for i, error in enumerate(result["errors"]) if not error]


def ttft_cdf(ax: Axes, result: dict, label: str | None = None) -> None:
    ttfts_ms = np.sort([result["ttfts"][i] * 1000.0 for i in _ok(result)])
    if len(ttfts_ms):
        fractions = np.arange(len(ttfts_ms) + 1) / len(ttfts_ms)  # starts at 0 just before the fastest
        ax.step(np.concatenate([ttfts_ms[:1], ttfts_ms]), fractions, where="post", label=label)
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)


def token_gaps_over_time(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """(when each token arrived, s since the start; the gap before it, ms), over all requests."""
    times, gaps = [], []
    for i in _ok(result):
        itls = np.asarray(result["itls"][i], dtype=np.float64)
        first = result["start_times"][i] + result["ttfts"][i]
        times.append(first + np.cumsum(itls))
        gaps.append(itls * 1000.0)
    if not times:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(times), np.concatenate(gaps)


def binned_median(times: np.ndarray, values: np.ndarray, bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Median of `values` in equal time bins (empty bins left out)."""
    if not len(times):
        return np.zeros(0), np.zeros(0)
    edges = np.linspace(times.min(), times.max() + 1e-9, bins + 1)
    which = np.clip(np.digitize(times, edges) - 1, 0, bins - 1)
    filled = [b for b in range(bins) if np.any(which == b)]
    centers = np.array([(edges[b] + edges[b + 1]) / 2 for b in filled])
    return centers, np.array([np.median(values[which == b]) for b in filled])


def itl_over_time(ax: Axes, result: dict, label: str | None = None) -> None:
    """Every gap as a dot, plus the running median as a line; log scale, as stalls are 10-100x the median."""
    times, gaps = token_gaps_over_time(result)
    dots = ax.scatter(times, gaps, s=4, alpha=0.3)
    centers, medians = binned_median(times, gaps)
    ax.plot(centers, medians, color=dots.get_facecolor()[0][:3], linewidth=2, label=f"{label} (median)" if label else "median")
    if len(gaps) and gaps.min() > 0:
        ax.set_yscale("log")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("inter-token latency (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)
    return path


def save_run_plots(result: dict, plot_dir: Path) -> list[Path]:
    title = f"{result.get('model_id', '')} · {result.get('workload', '')} · {result.get('load', '')}"
    paths = []
    for name, draw in (("ttft_cdf.png", ttft_cdf), ("itl_over_time.png", itl_over_time)):
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        ax = figure.add_subplot()
        draw(ax, result)
        ax.set_title(title, fontsize=9)
        paths.append(_save(figure, Path(plot_dir) / name))
    return paths


def save_compare_plot(results: dict[str, dict], path: Path) -> Path:
    """Both panels with one series per mode."""
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    cdf_ax, itl_ax = figure.subplots(1, 2)
    for mode, result in results.items():
        ttft_cdf(cdf_ax, result, label=mode)
        itl_over_time(itl_ax, result, label=mode)
    cdf_ax.legend()
    first = next(iter(results.values()))
    figure.suptitle(f"{first.get('model_id', '')} · {first.get('workload', '')} · {first.get('load', '')}", fontsize=10)
    return _save(figure, Path(path))
