"""What the prefill and decode handlers share inside one worker process."""

from __future__ import annotations

from dataclasses import dataclass, field

from nats.aio.client import Client as NatsClient

from services.worker.cancellations import Cancellations
from services.worker.engine_loop import EngineLoop
from services.worker.metrics import WorkerMetrics
from services.worker.rates import MeasuredRates
from services.worker.requests import RequestTable
from services.worker.streams import TokenStreams
from shared.engine.engine import TokenOutput
from shared.engine.loader import LoadedModel
from shared.engine.sampling import SamplingParams
from shared.layouts import Layout
from shared.protocol import ErrorCode, FinishReason, Role, Sampling, ServiceError, TokenLogprob
from shared.session import KvSessionEngine
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
    metrics: WorkerMetrics
    layout: Layout
    sessions: KvSessionEngine
    requests: RequestTable
    max_waiting: int = 64
    cancelled: Cancellations = field(default_factory=Cancellations)  # cancels that may precede their job
    draining: bool = False
    rates: MeasuredRates = field(default_factory=MeasuredRates)

    def refusal(self) -> ServiceError | None:
        """Why a new job cannot be taken now, if it cannot."""
        if self.draining:
            return ServiceError(ErrorCode.UNAVAILABLE, f"worker {self.worker_id} is draining")
        waiting = self.requests.waiting
        if waiting >= self.max_waiting:
            return ServiceError(ErrorCode.TOO_MANY_REQUESTS, f"worker {self.worker_id} has {waiting} requests waiting")
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
