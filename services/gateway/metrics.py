"""Gateway metrics (Prometheus), served at /metrics in the text exposition format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("pdserve_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pdserve_inter_token_latency_seconds", "Gap between streamed tokens", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("pdserve_request_queue_time_seconds", "Arrival to acceptance by a worker", buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("pdserve_requests", "Finished requests", ["finish_reason", "path"], registry=r)
        self.rejected = Counter("pdserve_requests_rejected", "Requests refused before generation", ["status"], registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens", "Generated tokens of finished requests", registry=r)
        self.migrations = Counter("pdserve_request_migrations", "Times requests moved to other workers after one failed", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
