"""Measuring this machine for `--hardware local`, once, and caching what was measured.

Two measurements, both of the project's real parts:
1. Engine steps, in this process: the model loaded as a worker loads it, an `Engine` with
   `pdserve up`'s defaults, the worker's torch thread count; whole prompts of several
   lengths as one step each, and decode steps at several batch sizes and context lengths.
   Medians of repeated steps (this machine is shared; a median resists a busy moment).
2. The serving stack, through `pdserve up` in each mode (colocated, disagg) with the same
   worker count: one request at a time, short and long prompts, through the bench's own
   client — what a request pays outside the engine (HTTP, NATS, streams), each token's cost
   in a running worker, and for disagg the KV hand-off over real UCX (bytes and seconds
   from `usage.pdserve`). Measured per mode because they differ on this machine (a worker
   that has handed off KV runs its decode steps slower: see docs/planner.md).
fit.py turns both into the `local` hardware. The profile is cached as JSON under the user
cache (`~/.cache/pdserve/planner/`), keyed by model, devices, threads and machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import secrets
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 2
PREFILL_LENGTHS = (32, 256, 1024, 2048)
DECODE_POINTS = ((1, 256), (4, 256), (16, 256), (64, 256), (1, 1024), (8, 1024), (32, 1024))
REPEATS = 5
STACK_OUTPUT = 24
STACK_REPEATS = 4
SHORT_PROMPT = 32
STACK_MODES = ("colocated", "disagg")


@dataclass(frozen=True)
class StepSample:
    batch: int  # sequences in the step
    new_tokens: int  # per sequence (1 for decodes)
    context: int  # cached tokens per sequence before the step
    seconds: float


@dataclass(frozen=True)
class StackSample:
    prompt: int
    ttft_s: float
    gaps_s: tuple[float, ...]  # between consecutive tokens


@dataclass(frozen=True)
class StackProbe:
    samples: tuple[StackSample, ...]
    kv_bytes: int = 0  # one hand-off's KV, as usage.pdserve reports it (disagg)
    kv_seconds: float = 0.0  # its UCX transfer

    @classmethod
    def from_json(cls, raw: dict) -> StackProbe:
        samples = tuple(StackSample(s["prompt"], s["ttft_s"], tuple(s["gaps_s"])) for s in raw["samples"])
        return cls(samples, raw["kv_bytes"], raw["kv_seconds"])


@dataclass
class LocalProfile:
    model: str
    devices: int
    threads: int
    steps: list[StepSample] = field(default_factory=list)
    stacks: dict[str, StackProbe] = field(default_factory=dict)  # by mode: "colocated", "disagg"
    machine: str = ""
    created: str = ""

    def to_json(self) -> dict:
        return asdict(self) | {"format": FORMAT_VERSION}

    @classmethod
    def from_json(cls, raw: dict) -> LocalProfile:
        if raw.get("format") != FORMAT_VERSION:
            raise ValueError("profile format changed")
        raw = {k: v for k, v in raw.items() if k != "format"}
        steps = [StepSample(**s) for s in raw.pop("steps")]
        stacks = {mode: StackProbe.from_json(probe) for mode, probe in raw.pop("stacks").items()}
        return cls(steps=steps, stacks=stacks, **raw)


def machine_id() -> str:
    return f"{platform.machine()} {platform.processor() or platform.platform()} x{os.cpu_count()}"


def default_threads(devices: int) -> int:
    """What `pdserve up` gives each worker: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // devices)


def cache_path(model: str, devices: int, threads: int) -> Path:
    from shared.engine.weight_cache import user_cache_root

    key = json.dumps([model, devices, threads, machine_id(), FORMAT_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return user_cache_root() / "planner" / f"profile-{Path(model).name}-{digest}.json"


# -- 1. engine steps ---------------------------------------------------------------------------


def measure_engine(model: str, threads: int, progress=lambda _: None) -> list[StepSample]:
    import torch

    from shared.engine.engine import Engine, SchedulingConfig
    from shared.engine.loader import load_model
    from shared.engine.sampling import SamplingParams

    torch.set_num_threads(threads)
    progress(f"profiling the engine of {model} ({threads} thread(s))")
    loaded = load_model(model)
    longest = max(PREFILL_LENGTHS)
    engine = Engine(loaded, kv_cache_tokens=32768, block_size=16,
                    scheduling=SchedulingConfig(max_num_batched_tokens=longest, max_num_seqs=256))
    limit = loaded.config.max_position_embeddings
    names = (f"p{i}" for i in range(1 << 30))

    def sampling(tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, seed=0, max_tokens=tokens, ignore_eos=True)

    def prompt(n: int) -> list[int]:
        return [(7 * i + 3) % loaded.config.vocab_size for i in range(n)]

    def prefill(n: int) -> float:
        rid = next(names)
        engine.add_request(rid, prompt(n), sampling(1))
        started = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - started
        engine.free(rid)
        return elapsed

    def decode(batch: int, context: int) -> list[float]:
        rids = [next(names) for _ in range(batch)]
        for rid in rids:
            engine.add_request(rid, prompt(context), sampling(REPEATS + 2))
        while engine.scheduler.waiting or any(s.prefilling for s in engine.scheduler.admitted.values()):
            engine.step()
        times = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        for rid in rids:
            engine.free(rid)
        return times

    prefill(SHORT_PROMPT)  # warm-up: first calls pay for allocations
    samples = []
    for n in (n for n in PREFILL_LENGTHS if n < limit):
        samples.append(StepSample(1, n, 0, statistics.median(prefill(n) for _ in range(REPEATS))))
    for batch, context in DECODE_POINTS:
        if batch * (context + REPEATS + 2) <= 32768 and context + REPEATS + 2 < limit:
            samples.append(StepSample(batch, 1, context, statistics.median(decode(batch, context))))
    return samples


# -- 2. the stack --------------------------------------------------------------------------------


async def _requests(base_url: str, model: str, prompt: int, repeats: int, api_key: str) -> list[StackSample]:
    import aiohttp

    from loadtest import client
    from loadtest.schedule import RequestSpec

    target = client.Target(base_url, model, api_key=api_key)
    out = []
    async with aiohttp.ClientSession() as session:
        for i in range(repeats):
            spec = RequestSpec(i, 0.0, prompt, STACK_OUTPUT, [(5 * k + 11) % 4096 + 10 for k in range(prompt)])
            outcome = await client.send(session, target, spec, time.perf_counter())
            if not outcome.success:
                raise RuntimeError(f"profiling request failed: {outcome.error}")
            out.append(StackSample(prompt, outcome.ttft_s, tuple(outcome.itls_s)))
    return out


def measure_stack(base_url: str, model: str, long_prompt: int, mode: str, api_key: str) -> StackProbe:
    """Single requests through a running stack of `mode` (for disagg, also one hand-off's KV bytes and UCX seconds)."""
    from loadtest.handoff_latency import one_request

    asyncio.run(_requests(base_url, model, SHORT_PROMPT, 2, api_key))  # warm-up: caches, UCX endpoints
    samples = asyncio.run(_requests(base_url, model, SHORT_PROMPT, STACK_REPEATS, api_key))
    samples += asyncio.run(_requests(base_url, model, long_prompt, STACK_REPEATS, api_key))
    if mode != "disagg":
        return StackProbe(tuple(samples))
    prompt = [(5 * k + 11) % 4096 + 10 for k in range(long_prompt)]
    handoff = asyncio.run(one_request(base_url, model, prompt, STACK_OUTPUT, api_key))
    return StackProbe(tuple(samples), handoff.kv_bytes, handoff.kv_seconds)


def long_prompt_for(model_context: int) -> int:
    return min(1024, model_context // 4)


def profile_machine(model: str, devices: int, threads: int, log_dir: Path | None = None, progress=lambda _: None) -> LocalProfile:
    """Measures the engine, then a `pdserve up` stack of each mode started here."""
    from loadtest.stack import StackSpec, running_stack
    from shared.engine.loader import load_model_config

    profile = LocalProfile(model, devices, threads, machine=machine_id(), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    profile.steps = measure_engine(model, threads, progress)
    long_prompt = long_prompt_for(load_model_config(model).max_position_embeddings)
    log_dir = log_dir or cache_path(model, devices, threads).parent
    for mode in STACK_MODES:
        progress(f"profiling a pdserve up --mode {mode} stack of {max(2, devices)} workers")
        api_key = secrets.token_urlsafe(16)
        spec = StackSpec(model, mode, max(2, devices), threads=threads)
        with running_stack(spec, log_dir / f"profile-{mode}.log", api_key=api_key) as url:
            profile.stacks[mode] = measure_stack(url, model, long_prompt, mode, api_key)
    return profile


def load_or_profile(model: str, devices: int, threads: int | None = None, refresh: bool = False,
                    progress=lambda _: None) -> LocalProfile:
    threads = threads or default_threads(devices)
    path = cache_path(model, devices, threads)
    if path.is_file() and not refresh:
        try:
            return LocalProfile.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            progress(f"ignoring an unreadable profile at {path}")
    profile = profile_machine(model, devices, threads, progress=progress)
    save(profile, path)
    progress(f"profile cached at {path}")
    return profile


def save(profile: LocalProfile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=1))
    tmp.replace(path)


def local_hardware(model: str, devices: int, threads: int | None = None, refresh: bool = False, progress=lambda _: None):
    """The `local` hardware for `model` on `devices` worker processes, by mode (measured once, then cached)."""
    from planner.fit import fit_local
    from planner.model_spec import load_model_spec

    profile = load_or_profile(model, devices, threads, refresh, progress)
    return fit_local(load_model_spec(model), profile)
