"""What is planned (model, hardware, workload, devices, SLOs) and the two ways to simulate a deployment.

- `run`: exactly the given arrivals on the whole deployment, every request counted, as a
  bench run sends them (to set beside a measured `pdserve bench` run).
- `steady`: steady state at a rate. A *pooled part* of the deployment runs at its share of
  the rate: copies of its smallest identical unit (one colocated instance; prefill and
  decode instance counts divided by their greatest common divisor) until the part has
  `POOLED_INSTANCES` instances or is the whole deployment. The first requests, as many as
  the system holds at the SLOs' edge (rate x (mean output x TPOT SLO + TTFT SLO)), fill it
  and are left out of the statistics (a goodput search passes 1.5x the mean time in system
  its previous probe measured, when shorter). Placement spreads load evenly, so parts
  behave alike; only pooling across parts is lost. Why not the bare unit: a queue served
  by 2 instances waits far longer than one served by 4 at the same load, so simulating
  4 prefill + 2 decode as two units of 2 + 1 made it lose ~10% goodput to 4 + 1 with the
  very same prefill pool: the ranking of candidates then followed how their counts
  factor, not the hardware.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property

from planner.capacity import MeanRequest
from planner.deployment import MAX_NUM_SEQS, MAX_WAITING, Deployment, sim_block_size
from planner.hardware import Hardware
from planner.metrics import Slo, Summary, summarize
from planner.model_spec import ModelSpec
from planner.simulator import Arrival, SimConfig, simulate
from planner.workload import RequestSource
from services.scheduler.policy import Mode
from shared.protocol import Role

MAX_WARMUP = 2000  # at most this many requests simulated before a steady-state run starts counting
POOLED_INSTANCES = 8  # a steady-state run simulates at least this many instances (or all): queues pool as deployed
# Step budgets (max_num_batched_tokens) tried per role: pdserve's defaults (2048 prefill, 512
# where decodes run) and larger ones, so colocated gets its best prefill/decode trade-off too.
STEP_BUDGETS = {Role.BOTH: (512, 2048, 8192), Role.PREFILL: (2048, 8192), Role.DECODE: (512,)}


def unit(deployment: Deployment) -> tuple[Deployment, int]:
    """The smallest deployment of the same pools in the same proportion, and how many make the whole."""
    scale = math.gcd(*(p.count for p in deployment.pools))
    pools = tuple(dataclasses.replace(p, count=p.count // scale) for p in deployment.pools)
    return Deployment(deployment.mode, pools), scale


def pooled_part(deployment: Deployment) -> tuple[Deployment, float]:
    """Copies of the smallest unit with at least `POOLED_INSTANCES` instances (or the whole), and
    the share of the deployment's traffic it serves."""
    smallest, scale = unit(deployment)
    instances = sum(p.count for p in smallest.pools)
    copies = min(scale, math.ceil(POOLED_INSTANCES / instances))
    pools = tuple(dataclasses.replace(p, count=p.count * copies) for p in smallest.pools)
    return Deployment(deployment.mode, pools), copies / scale


@dataclass(frozen=True)
class Scenario:
    model: ModelSpec
    hardware: Hardware
    source: RequestSource
    devices: int
    slo: Slo
    step_budgets: dict[Role, tuple[int, ...]] = field(default_factory=lambda: dict(STEP_BUDGETS))
    search_requests: int = 200  # measured requests per steady-state probe
    max_num_seqs: int = MAX_NUM_SEQS
    max_waiting: int = MAX_WAITING
    mode_hardware: dict[Mode, Hardware] = field(default_factory=dict)  # `local`: each mode's stack measured apart

    def __post_init__(self) -> None:
        if self.devices < 1 or self.search_requests < 10:
            raise ValueError(f"need devices >= 1 and search_requests >= 10, got {self.devices}, {self.search_requests}")

    def hardware_for(self, mode: Mode) -> Hardware:
        return self.mode_hardware.get(mode, self.hardware)

    @cached_property
    def max_request_tokens(self) -> int:
        return self.source.max_request_tokens()

    @cached_property
    def mean_lengths(self) -> tuple[float, float]:
        return self.source.mean_lengths()

    def mean_request(self) -> MeanRequest:
        mean_in, mean_out = self.mean_lengths
        return MeanRequest(mean_in, mean_out, self.slo.tpot_ms / 1000)

    def budgets(self, role: Role) -> list[int]:
        """The role's step budgets worth trying: those below the longest prompt, and the first that holds it."""
        longest = self.source.max_input_len()
        budgets = sorted(self.step_budgets[role])
        return [b for b in budgets if b < longest] + [b for b in budgets if b >= longest][:1]

    def sim_config(self, deployment: Deployment, concurrency: int | None = None, warmup: int = 0) -> SimConfig:
        return SimConfig(deployment, self.model, self.hardware_for(deployment.mode), self.max_num_seqs, self.max_waiting, concurrency,
                         block_size=sim_block_size(self.hardware, self.max_request_tokens), warmup=warmup)

    def run(self, deployment: Deployment, arrivals: list[Arrival], concurrency: int | None = None) -> Summary:
        return summarize(simulate(self.sim_config(deployment, concurrency), arrivals), self.slo)

    @property
    def slo_lifetime_s(self) -> float:
        """How long a mean request stays in the system at the SLOs' edge."""
        return self.mean_lengths[1] * self.slo.tpot_ms / 1000 + self.slo.ttft_ms / 1000

    def steady(self, deployment: Deployment, rate: float, measured: int, lifetime_s: float | None = None) -> Summary:
        """`lifetime_s`: how long requests stay (default: at the SLOs' edge); the warm-up is rate x that."""
        part, fraction = pooled_part(deployment)
        share = rate * fraction
        lifetime = min(lifetime_s or self.slo_lifetime_s, self.slo_lifetime_s)
        warmup = min(MAX_WARMUP, math.ceil(share * lifetime))
        arrivals = self.source.at_rate(share, warmup + measured)
        return summarize(simulate(self.sim_config(part, warmup=warmup), arrivals), self.slo, 1 / fraction)
