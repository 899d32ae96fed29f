"""Every NATS subject pdserve uses, built in one place (ARCHITECTURE.md §4).

The prefix lets several deployments share one nats-server.
"""

from __future__ import annotations

from dataclasses import dataclass

PLACE_QUEUE_GROUP = "pd-schedulers"


@dataclass(frozen=True)
class Subjects:
    prefix: str = "pd"

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in " .*>"):
            raise ValueError(f"subject prefix must be one plain token, got {self.prefix!r}")

    @property
    def place(self) -> str:
        return f"{self.prefix}.sched.place"

    @property
    def ready(self) -> str:
        """Readiness checks (gateway /health): answered by one scheduler of the queue group."""
        return f"{self.prefix}.sched.ready"

    def worker_prefill(self, worker_id: str) -> str:
        return f"{self.prefix}.worker.{worker_id}.prefill"

    def worker_decode(self, worker_id: str) -> str:
        return f"{self.prefix}.worker.{worker_id}.decode"

    def worker_cancel(self, worker_id: str) -> str:
        return f"{self.prefix}.worker.{worker_id}.cancel"

    def heartbeat(self, role: str, worker_id: str) -> str:
        return f"{self.prefix}.heartbeat.{role}.{worker_id}"

    @property
    def all_heartbeats(self) -> str:
        return f"{self.prefix}.heartbeat.>"

    def admin(self, instance_id: str, endpoint: str) -> str:
        """Admin endpoints are per instance, so `drain` reaches exactly the worker named."""
        return f"{self.prefix}.admin.{instance_id}.{endpoint}"

    @property
    def worker_down(self) -> str:
        """Scheduler -> every gateway: a worker failed (WorkerDown); not a queue group."""
        return f"{self.prefix}.events.worker_down"

    def stream(self, request_id: str) -> str:
        return f"{self.prefix}.stream.{request_id}"
