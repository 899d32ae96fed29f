"""What is sent: input/output token lengths, drawn from a mix or replayed from a trace.

Every synthetic workload is a `LengthMix`: weighted request classes, each with a uniform
input-length range and a uniform output-length range.

- `fixed`: every request has the same lengths.
- `random`: uniform within ±range_ratio of the given lengths (vllm's `--random-range-ratio`).
- `long-prompt`: the seed's long-prompt workload (long prompts, a few hundred output
  tokens) scaled to what a 2-core CPU runs in minutes: 512–1024 in, 32–64 out.
- `chat-mix`: a quarter long-context requests (512–1024 in, 32–64 out) among short chat
  turns (32–128 in, 16–64 out).

A trace is JSONL with one request per line: `timestamp`, `input_length`, `output_length`
(the Mooncake trace format; other keys are ignored). Timestamps are in milliseconds by
default and are rebased so the first request is sent at t = 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LengthRange:
    low: int
    high: int  # inclusive

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"need 1 <= low <= high, got [{self.low}, {self.high}]")

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))


@dataclass(frozen=True)
class RequestClass:
    name: str
    weight: float
    input_len: LengthRange
    output_len: LengthRange


@dataclass(frozen=True)
class LengthMix:
    name: str
    classes: tuple[RequestClass, ...]

    def __post_init__(self) -> None:
        if not self.classes or any(c.weight <= 0 for c in self.classes):
            raise ValueError("a mix needs at least one class, every weight > 0")

    def sample(self, rng: np.random.Generator) -> tuple[int, int]:
        """(input_len, output_len) of one request."""
        weights = np.array([c.weight for c in self.classes])
        chosen = self.classes[int(rng.choice(len(self.classes), p=weights / weights.sum()))]
        return chosen.input_len.sample(rng), chosen.output_len.sample(rng)

    def max_total_len(self) -> int:
        return max(c.input_len.high + c.output_len.high for c in self.classes)


def fixed(input_len: int, output_len: int) -> LengthMix:
    one = RequestClass("fixed", 1.0, LengthRange(input_len, input_len), LengthRange(output_len, output_len))
    return LengthMix("fixed", (one,))


def _around(length: int, ratio: float) -> LengthRange:
    return LengthRange(max(1, round(length * (1 - ratio))), max(1, round(length * (1 + ratio))))


def uniform_around(input_len: int, output_len: int, range_ratio: float) -> LengthMix:
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    one = RequestClass("random", 1.0, _around(input_len, range_ratio), _around(output_len, range_ratio))
    return LengthMix("random", (one,))


LONG_PROMPT = LengthMix("long-prompt", (RequestClass("long", 1.0, LengthRange(512, 1024), LengthRange(32, 64)),))

CHAT_MIX = LengthMix(
    "chat-mix",
    (
        RequestClass("long-context", 0.25, LengthRange(512, 1024), LengthRange(32, 64)),
        RequestClass("chat", 0.75, LengthRange(32, 128), LengthRange(16, 64)),
    ),
)

PRESET_MIXES = {mix.name: mix for mix in (LONG_PROMPT, CHAT_MIX)}
WORKLOADS = ("fixed", "random", *PRESET_MIXES, "trace")


@dataclass(frozen=True)
class TraceRecord:
    timestamp_s: float  # send time, relative to the trace's first request
    input_len: int
    output_len: int


@dataclass(frozen=True)
class Trace:
    name: str
    records: tuple[TraceRecord, ...]
    speedup: float = 1.0  # send times are divided by this

    def __post_init__(self) -> None:
        if self.speedup <= 0:
            raise ValueError(f"trace speedup must be > 0, got {self.speedup}")


Workload = LengthMix | Trace

_SECONDS_PER_UNIT = {"ms": 1e-3, "s": 1.0}


def load_trace(path: Path, time_unit: str = "ms", length_scale: float = 1.0) -> list[TraceRecord]:
    """Records sorted by time; `length_scale` shrinks (or grows) both lengths, never below 1."""
    if time_unit not in _SECONDS_PER_UNIT:
        raise ValueError(f"time unit must be one of {sorted(_SECONDS_PER_UNIT)}, got {time_unit!r}")
    if length_scale <= 0:
        raise ValueError(f"length scale must be > 0, got {length_scale}")
    raw = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            raw.append((float(row["timestamp"]), int(row["input_length"]), int(row["output_length"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: need timestamp, input_length, output_length ({exc})") from None
    if not raw:
        raise ValueError(f"{path}: the trace is empty")
    raw.sort(key=lambda r: r[0])
    unit, first = _SECONDS_PER_UNIT[time_unit], raw[0][0]
    return [TraceRecord((t - first) * unit, _scaled(i, length_scale), _scaled(o, length_scale)) for t, i, o in raw]


def _scaled(length: int, factor: float) -> int:
    return max(1, round(length * factor))
