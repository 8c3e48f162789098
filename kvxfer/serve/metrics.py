"""Prometheus metrics of the router (one registry per router, so several routers can live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Latency buckets in seconds: sub-millisecond router overheads up to multi-second CPU prefills.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: TTFT parts, in the order they add up: queue wait, prefill, KV transfer, first decode step.
TTFT_PARTS = ("queue", "prefill", "transfer", "first_step")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class RouterMetrics:
    """Every metric the router exports on ``/metrics`` (names prefixed ``kvxfer_``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvxfer_requests",
            "Finished requests by endpoint and outcome (stop, length, abort, error, rejected, invalid)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.rejections = Counter(
            "kvxfer_rejections", "Requests refused before any work, by reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "kvxfer_ttft_seconds", "Time to first token seen by the router", registry=r, buckets=LATENCY_BUCKETS
        )
        self.ttft_part = Histogram(
            "kvxfer_ttft_part_seconds",
            "TTFT broken down: queue, prefill, transfer, first_step",
            ["part"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.itl = Histogram("kvxfer_itl_seconds", "Inter-token latency", registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("kvxfer_e2e_seconds", "End-to-end request latency", registry=r, buckets=LATENCY_BUCKETS)
        self.router_overhead = Histogram(
            "kvxfer_router_overhead_seconds",
            "Router time from request arrival to the dispatch of its first message to a worker",
            registry=r,
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1),
        )
        self.prompt_tokens = Counter("kvxfer_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("kvxfer_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge(
            "kvxfer_prefill_queue_depth", "Requests waiting in the prefill queue", ["priority"], registry=r
        )
        self.queue_tokens = Gauge(
            "kvxfer_prefill_queue_tokens", "Prompt tokens waiting in the prefill queue", registry=r
        )
        self.in_flight = Gauge("kvxfer_requests_in_flight", "Requests admitted and not finished", registry=r)
        self.pool = Gauge("kvxfer_workers", "Registered live workers by role", ["role"], registry=r)
        self.free_blocks = Gauge(
            "kvxfer_worker_free_blocks", "Free KV blocks a worker last reported", ["worker", "role"], registry=r
        )
        self.active_blocks = Gauge(
            "kvxfer_worker_active_blocks", "Active KV blocks a worker last reported", ["worker", "role"], registry=r
        )
        self.kv_bytes = Counter("kvxfer_kv_transfer_bytes", "KV bytes moved prefill -> decode", registry=r)
        self.kv_seconds = Histogram(
            "kvxfer_kv_transfer_seconds", "KV transfer time per request", registry=r, buckets=LATENCY_BUCKETS
        )
        self.decisions = Counter(
            "kvxfer_disaggregation_decisions",
            "Prefill placement per admitted request (remote = a prefill worker, local = the decode worker)",
            ["prefill", "reason"],
            registry=r,
        )
        self.requeues = Counter("kvxfer_prefill_requeues", "Prefill requests requeued after a worker died", registry=r)
        self.worker_losses = Counter("kvxfer_worker_losses", "Workers dropped (heartbeat lost)", ["role"], registry=r)
        self.aborts = Counter(
            "kvxfer_aborts",
            "Aborts sent to workers by cause (disconnect, stop, deadline, failure)",
            ["cause"],
            registry=r,
        )

    def observe_ttft(self, ttft_s: float, timing: dict[str, float]) -> None:
        """Record one request's TTFT and its parts (those the workers reported)."""
        self.ttft.observe(ttft_s)
        for part in TTFT_PARTS:
            value = timing.get(f"{part}_s")
            if isinstance(value, (int, float)) and value >= 0:
                self.ttft_part.labels(part).observe(value)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
