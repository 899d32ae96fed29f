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


def synthetic(mix: LengthMix, load: LoadShape, source: PromptSource, seed: int, as_text: bool = False) -> Iterator[RequestSpec]:
    """An endless schedule; the runner stops it at the request count or the duration."""
    arrival_rng, length_rng, prompt_rng = _streams(seed)
    times = load.send_times(arrival_rng) if isinstance(load, OpenLoop) else itertools.repeat(0.0)
    for index, send_at in enumerate(times):
        input_len, output_len = mix.sample(length_rng)
        yield RequestSpec(index, send_at, input_len, output_len, _prompt(source, input_len, as_text, prompt_rng))


def replay(trace: Trace, source: PromptSource, seed: int, as_text: bool = False) -> Iterator[RequestSpec]:
    """The trace's own send times (divided by its speedup) and lengths."""
    _, _, prompt_rng = _streams(seed)
    for index, record in enumerate(trace.records):
        prompt = _prompt(source, record.input_len, as_text, prompt_rng)
        yield RequestSpec(index, record.timestamp_s / trace.speedup, record.input_len, record.output_len, prompt)


def build(workload: Workload, load: LoadShape, source: PromptSource, seed: int, as_text: bool = False) -> Iterator[RequestSpec]:
    match workload:
        case Trace():
            return replay(workload, source, seed, as_text)
        case LengthMix():
            return synthetic(workload, load, source, seed, as_text)
    raise TypeError(f"not a workload: {workload!r}")
