"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a per-request seed.

A step samples every row of its logits with `sample_batch`: greedy rows in one argmax,
the others each with their request's own generator, and log-probabilities (of the raw
model distribution, before temperature or filtering) for requests that ask for them.

Reproducibility: the draw for a request's n-th generated token uses a generator seeded
from (request seed, n). It depends on nothing else (not batch mates, not which worker
ran the step), so prefill on one machine and decode on another give the same tokens as
running both on one.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 5  # the most top alternatives a request may ask for
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / phi: spreads consecutive step indices over the seed space


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept; 1 keeps all
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    seed: int | None = None  # None: a random seed is drawn per request
    max_tokens: int = 16  # generated tokens, the first (from prefill) included
    stop_token_ids: tuple[int, ...] = ()  # finish with "stop" on these, even with ignore_eos
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely (k <= 5)
    step_offset: int = 0  # tokens generated elsewhere before (a migrated request): added to each draw's index

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.step_offset < 0:
            raise ValueError(f"step_offset must be >= 0, got {self.step_offset}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}] (or None), got {self.logprobs}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestSampler:
    """A request's sampling state: its params and its own torch.Generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator(device="cpu")

    def sample(self, logits: torch.Tensor, step: int) -> int:
        """The token for generated index `step` (0 for the first token here) from logits `[vocab]`.

        The draw is seeded by the request's own index, `step + step_offset`.
        """
        if self.params.greedy:
            return int(logits.argmax())
        self._generator.manual_seed(_step_seed(self.seed, step + self.params.step_offset))
        probs = _filtered_probs(logits.float(), self.params)
        return int(torch.multinomial(probs, 1, generator=self._generator))


@dataclass(frozen=True)
class Choice:
    """A sampled token, with its log-probability and the top alternatives when the request asked."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # most likely first


def sample_batch(logits: torch.Tensor, samplers: Sequence[RequestSampler], steps: Sequence[int]) -> list[Choice]:
    """One token per row: row i of logits `[R, vocab]` for `samplers[i]` at generated index `steps[i]`."""
    greedy = _greedy_tokens(logits, samplers)
    choices = [
        Choice(greedy[row] if row in greedy else sampler.sample(logits[row], step))
        for row, (sampler, step) in enumerate(zip(samplers, steps))
    ]
    wanted = [row for row, sampler in enumerate(samplers) if sampler.params.logprobs is not None]
    if wanted:
        logprobs = torch.log_softmax(logits[wanted].float(), dim=-1)  # [W, vocab]
        for row, row_logprobs in zip(wanted, logprobs):
            choices[row] = _with_logprobs(choices[row].token_id, row_logprobs, samplers[row].params.logprobs or 0)
    return choices


def _greedy_tokens(logits: torch.Tensor, samplers: Sequence[RequestSampler]) -> dict[int, int]:
    """row -> argmax, for every greedy row (one op for all of them)."""
    greedy = [row for row, sampler in enumerate(samplers) if sampler.params.greedy]
    if not greedy:
        return {}
    picked = logits.argmax(dim=-1) if len(greedy) == len(samplers) else logits[greedy].argmax(dim=-1)
    return dict(zip(greedy, picked.tolist()))


def _with_logprobs(token_id: int, logprobs: torch.Tensor, num_top: int) -> Choice:
    # logprobs: [vocab] float32
    top: list[tuple[int, float]] = []
    if num_top:
        values, ids = torch.topk(logprobs, num_top)
        top = list(zip(ids.tolist(), values.tolist()))
    return Choice(token_id, float(logprobs[token_id]), top)


def _step_seed(seed: int, step: int) -> int:
    return ((seed * _GOLDEN) ^ (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    # logits: [V] float32 -> probs: [V], zero outside the top-k / top-p set
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p_filter(probs, params.top_p)
    return probs


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest most-likely set whose mass reaches top_p (always at least one token)."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs  # [V]: mass of strictly more likely tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)
