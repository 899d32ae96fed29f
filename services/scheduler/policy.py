"""Placement: a pure, synchronous function of (request, live workers) -> placement.

Kept free of I/O so it is tested without NATS (the scheduler service is the shell).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from services.scheduler.registry import WorkerLoad
from shared.protocol import ErrorCode, Path, PlaceRequest, Placement, Role, ServiceError


class Mode(enum.Enum):
    DISAGG = "disagg"
    COLOCATED = "colocated"

    @classmethod
    def parse(cls, text: str) -> "Mode":
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown mode {text!r}; choose one of: {choices}") from None


def _least_loaded_prefill(workers: Sequence[WorkerLoad]) -> WorkerLoad:
    return min(workers, key=lambda w: (w.queued_prefill_tokens, w.running, w.worker_id))


def _least_loaded_decode(workers: Sequence[WorkerLoad]) -> WorkerLoad:
    return min(workers, key=lambda w: (w.running, -w.beat.free_kv_blocks, w.worker_id))


def _unavailable(message: str) -> ServiceError:
    return ServiceError(code=ErrorCode.UNAVAILABLE, message=message)


def place(request: PlaceRequest, workers: Sequence[WorkerLoad], mode: Mode) -> Placement | ServiceError:
    serving = [w for w in workers if w.beat.model == request.model]
    if not serving:
        return _unavailable(f"no live worker serves model {request.model!r}")
    if mode is Mode.COLOCATED:
        both = [w for w in serving if w.beat.role is Role.BOTH]
        if not both:
            return _unavailable("no live colocated (role=both) worker")
        chosen = _least_loaded_decode(both)
        return Placement(request.request_id, Path.COLOCATED, chosen.worker_id, chosen.worker_id)
    prefills = [w for w in serving if w.beat.role in (Role.PREFILL, Role.BOTH)]
    decodes = [w for w in serving if w.beat.role in (Role.DECODE, Role.BOTH)]
    if not prefills or not decodes:
        return _unavailable("disaggregated mode needs a live prefill worker and a live decode worker")
    prefill = _least_loaded_prefill(prefills)
    decode = _least_loaded_decode(decodes)
    path = Path.COLOCATED if prefill.worker_id == decode.worker_id else Path.DISAGG
    return Placement(request.request_id, path, prefill.worker_id, decode.worker_id)


def record_placement(placement: Placement, request: PlaceRequest, workers: dict[str, WorkerLoad]) -> None:
    """Counts a placement against the chosen workers until their next heartbeat."""
    if (prefill := workers.get(placement.prefill_worker)) is not None:
        prefill.placed_prefill_tokens += request.num_prompt_tokens
    if (decode := workers.get(placement.decode_worker)) is not None:
        decode.placed_decodes += 1
