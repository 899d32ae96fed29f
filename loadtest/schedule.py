"""The request schedule: send times, lengths and prompts, fully determined by the seed.

Arrival gaps, lengths and prompt offsets come from three independent random streams
spawned from one seed, so the same seed gives the same schedule whatever consumes it —
`bench compare` replays the identical schedule against every mode.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from loadtest.arrivals import LoadShape, OpenLoop
from loadtest.prompts import PromptSource
from loadtest.workloads import LengthMix, Trace, Workload


@dataclass(frozen=True)
class RequestSpec:
    index: int
    send_at: float  # seconds after the start; 0 for closed-loop runs (ignored there)
    input_len: int
    output_len: int
    prompt: list[int] | str  # token ids (completions) or text (chat)


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    arrivals, lengths, prompts = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    return arrivals, lengths, prompts


def _prompt(source: PromptSource, length: int, as_text: bool, rng: np.random.Generator) -> list[int] | str:
    return source.text(length, rng) if as_text else source.token_ids(length, rng)


@dataclass(frozen=True)
class Timing:
    """When a request is sent and how long it is, without its prompt (what `pdserve plan` simulates)."""

    index: int
    send_at: float
    input_len: int
    output_len: int


def timings(workload: Workload, load: LoadShape, seed: int) -> Iterator[Timing]:
    """The schedule's send times and lengths: exactly those of `build` with the same arguments.

    The prompt stream is separate from these two, so leaving prompts out changes nothing here.
    """
    arrival_rng, length_rng, _ = _streams(seed)
    if isinstance(workload, Trace):
        for index, record in enumerate(workload.records):
            yield Timing(index, record.timestamp_s / workload.speedup, record.input_len, record.output_len)
        return
    times = load.send_times(arrival_rng) if isinstance(load, OpenLoop) else itertools.repeat(0.0)
    for index, send_at in enumerate(times):
        input_len, output_len = workload.sample(length_rng)
        yield Timing(index, send_at, input_len, output_len)


def _with_prompts(timed: Iterator[Timing], source: PromptSource, seed: int, as_text: bool) -> Iterator[RequestSpec]:
    _, _, prompt_rng = _streams(seed)
    for t in timed:
        yield RequestSpec(t.index, t.send_at, t.input_len, t.output_len, _prompt(source, t.input_len, as_text, prompt_rng))


def synthetic(mix: LengthMix, load: LoadShape, source: PromptSource, seed: int, as_text: bool = False) -> Iterator[RequestSpec]:
    """An endless schedule; the runner stops it at the request count or the duration."""
    return _with_prompts(timings(mix, load, seed), source, seed, as_text)


def replay(trace: Trace, source: PromptSource, seed: int, as_text: bool = False) -> Iterator[RequestSpec]:
    """The trace's own send times (divided by its speedup) and lengths."""
    return _with_prompts(timings(trace, load=OpenLoop(1.0), seed=seed), source, seed, as_text)


def build(workload: Workload, load: LoadShape, source: PromptSource, seed: int, as_text: bool = False) -> Iterator[RequestSpec]:
    match workload:
        case Trace():
            return replay(workload, source, seed, as_text)
        case LengthMix():
            return synthetic(workload, load, source, seed, as_text)
    raise TypeError(f"not a workload: {workload!r}")
