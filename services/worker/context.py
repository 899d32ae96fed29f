"""What the prefill and decode handlers share inside one worker process."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch
from nats.aio.client import Client as NatsClient

from services.worker.cancellations import Cancellations
from services.worker.engine_loop import EngineLoop
from services.worker.handoff import NatsAnnouncer
from services.worker.metrics import WorkerMetrics
from services.worker.rates import MeasuredRates
from services.worker.streams import TokenStreams
from shared.engine.loader import LoadedModel
from shared.engine.sampling import SamplingParams
from shared.session import KvSessionEngine
from shared.layouts import Layout
from shared.engine.engine import TokenOutput
from shared.protocol import ErrorCode, FinishReason, PrefillJob, Role, Sampling, ServiceError, TokenLogprob
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
    metrics: WorkerMetrics
    layout: Layout
    sessions: KvSessionEngine
    announcer: NatsAnnouncer
    max_waiting: int = 64
    cancelled: Cancellations = field(default_factory=Cancellations)
    waiting: int = 0  # accepted jobs without their first token here yet: queued prompts, incoming hand-offs
    draining: bool = False
    rates: MeasuredRates = field(default_factory=MeasuredRates)
    prefills: dict[str, PrefillJob] = field(default_factory=dict)  # accepted, first token not out yet

    @property
    def queued_prefill_tokens(self) -> int:
        return sum(len(job.prompt_ids) for job in self.prefills.values())

    def expect_first_token(self, job: PrefillJob) -> None:
        """Counts an accepted prefill job as waiting from now (so bursts see a full queue at once)."""
        self.prefills[job.request_id] = job
        self.waiting += 1

    def take_prefill(self, request_id: str) -> PrefillJob | None:
        """The job, if its first token was still to come: it stops counting as waiting (once)."""
        job = self.prefills.pop(request_id, None)
        if job is not None:
            self.waiting -= 1
        return job

    def refusal(self) -> ServiceError | None:
        """Why a new job cannot be taken now, if it cannot."""
        if self.draining:
            return ServiceError(ErrorCode.UNAVAILABLE, f"worker {self.worker_id} is draining")
        if self.waiting >= self.max_waiting:
            return ServiceError(ErrorCode.TOO_MANY_REQUESTS, f"worker {self.worker_id} has {self.waiting} requests waiting")
        return None


def engine_sampling(sampling: Sampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
        ignore_eos=sampling.ignore_eos,
        stop_token_ids=tuple(sampling.stop_token_ids),
        logprobs=sampling.logprobs,
        step_offset=sampling.step_offset,
    )


def token_logprobs(out: TokenOutput) -> list[TokenLogprob] | None:
    """The wire form of a token's logprobs, or None when its request did not ask for them."""
    if out.logprob is None:
        return None
    top_ids = [token for token, _ in out.top_logprobs]
    return [TokenLogprob(out.logprob, top_ids, [logprob for _, logprob in out.top_logprobs])]


def finish_reason(label: str | None) -> FinishReason | None:
    return None if label is None else FinishReason[label.upper()]


KV_ROOM_POLL_S = 0.02


async def wait_for_kv_room(ctx: WorkerContext, request_id: str, num_tokens: int) -> bool:
    """Waits (in the worker's bounded queue) until the cache can take the request.

    False if the request was cancelled meanwhile. Blocks free as running requests finish,
    so this never waits on itself; the queue bound (`max_waiting`) keeps it finite.
    """
    engine = ctx.engine_loop.engine
    while not engine.can_admit(num_tokens):
        if request_id in ctx.cancelled:
            ctx.cancelled.discard(request_id)
            return False
        await asyncio.sleep(KV_ROOM_POLL_S)
    return request_id not in ctx.cancelled
