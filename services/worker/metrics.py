"""Worker metrics (Prometheus): engine steps, KV hand-off traffic, re-shard time, KV use, queue depth."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class WorkerMetrics:
    def __init__(self, worker_id: str, role: str):
        self.registry = CollectorRegistry()
        labels = {"worker_id": worker_id, "role": role}
        names = list(labels)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, names + list(extra), registry=self.registry)

        self.kv_transfer_bytes = counter("pdserve_worker_kv_transfer_bytes", "KV bytes moved over UCX", ("direction",))
        self.kv_transfer_seconds = Histogram(
            "pdserve_worker_kv_transfer_seconds", "Seconds per KV hand-off", names + ["direction"],
            buckets=_SECONDS_BUCKETS, registry=self.registry,
        )
        self.reshard_seconds = Histogram(
            "pdserve_worker_reshard_seconds", "Seconds to place received KV into the paged cache", names,
            buckets=_SECONDS_BUCKETS, registry=self.registry,
        )
        self.step_seconds = Histogram(
            "pdserve_worker_step_seconds", "Seconds per engine step (one forward pass)", names,
            buckets=_SECONDS_BUCKETS, registry=self.registry,
        )
        self.step_prompt_tokens = Histogram(
            "pdserve_worker_step_prompt_tokens", "Prompt tokens per engine step that ran any (several prompts, or chunks)",
            names, buckets=_TOKEN_BUCKETS, registry=self.registry,
        )
        self.prefill_tokens = counter("pdserve_worker_prefill_tokens", "Prompt tokens prefilled")
        self.generated_tokens = counter("pdserve_worker_generated_tokens", "Tokens generated")
        self.kv_usage = Gauge("pdserve_worker_kv_usage_ratio", "Share of KV blocks in use", names, registry=self.registry)
        self.running = Gauge("pdserve_worker_running_requests", "Requests decoding", names, registry=self.registry)
        self.waiting = Gauge("pdserve_worker_waiting_requests", "Requests queued or in hand-off", names, registry=self.registry)
        # Per rank of a multi-rank worker (rank 0 is the leader serving these metrics).
        self.rank_ucx_bytes = Gauge(
            "pdserve_worker_rank_ucx_bytes", "KV bytes a rank moved over its own UCX endpoint", names + ["rank", "direction"],
            registry=self.registry,
        )
        self.rank_kv_blocks_used = Gauge(
            "pdserve_worker_rank_kv_blocks_used", "KV pages in use in a rank's cache (its DP group's)", names + ["rank"],
            registry=self.registry,
        )
        self._labels = labels

    def labels(self, metric, **extra):
        return metric.labels(**self._labels, **extra)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
