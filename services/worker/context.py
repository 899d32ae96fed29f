"""What the prefill and decode handlers share inside one worker process."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from nats.aio.client import Client as NatsClient

from services.worker.engine_loop import EngineLoop
from services.worker.streams import TokenStreams
from shared.engine.loader import LoadedModel
from shared.engine.sampling import SamplingParams
from shared.protocol import FinishReason, Role, Sampling
from shared.subjects import Subjects


@dataclass
class WorkerContext:
    nc: NatsClient
    subjects: Subjects
    worker_id: str
    role: Role
    model: LoadedModel
    engine_loop: EngineLoop
    streams: TokenStreams
    kv_dtype: torch.dtype
    cancelled: set[str] = field(default_factory=set)
    queued_prefill_tokens: int = 0
    waiting: int = 0


def engine_sampling(sampling: Sampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
        ignore_eos=sampling.ignore_eos,
        stop_token_ids=tuple(sampling.stop_token_ids),
    )


def finish_reason(label: str | None) -> FinishReason | None:
    return None if label is None else FinishReason[label.upper()]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype
