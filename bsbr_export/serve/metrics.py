"""Prometheus metrics of one server (its own registry, so several servers can share a process),
and ``HTTPMetrics``, the ASGI middleware that counts every HTTP answer and its latency."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "HTTPMetrics", "LATENCY_BUCKETS", "Metrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = LATENCY_BUCKETS + (60.0, 120.0, 300.0, 600.0)


class Metrics:
    """Counters and histograms the scheduler feeds (from its loop thread) and gauges read from it."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("bsbr_queue_depth", "Requests waiting for a row", registry=r)
        self.active = Gauge("bsbr_active_sequences", "Requests holding a row (prefilling or decoding)", registry=r)
        self.free = Gauge("bsbr_free_rows", "Rows of the running batch that hold no request", registry=r)
        self.max_batch = Gauge("bsbr_max_batch", "Rows of the running batch", registry=r)
        self.tokens = Counter("bsbr_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("bsbr_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.requests = Counter("bsbr_requests_finished", "Requests ended, by finish reason", ["reason"], registry=r)
        self.rejected_total = Counter("bsbr_requests_rejected", "Requests refused with 429 (queue full)", registry=r)
        self.http = Counter("bsbr_http_responses", "HTTP responses by status code", ["code"], registry=r)
        self.latency = Histogram("bsbr_request_duration_seconds", "HTTP requests end to end (to the response's "
                                 "last byte), by status code", ["code"], buckets=REQUEST_BUCKETS, registry=r)
        self.ttft = Histogram("bsbr_time_to_first_token_seconds", "From submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("bsbr_time_per_output_token_seconds", "Between consecutive tokens of a request",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.steps = Histogram("bsbr_step_seconds", "One engine call of the loop", ["kind"],
                               buckets=LATENCY_BUCKETS, registry=r)
        # the prefix cache (runtime.prefix): its own counts, read at each sample
        self.cache = {k: Gauge(f"bsbr_prefix_cache_{k}", text, registry=r) for k, text in (
            ("hits", "Requests that started from a cached prompt state"),
            ("misses", "Requests that found no cached prompt state"),
            ("hit_tokens", "Prompt tokens taken from the prefix cache"),
            ("evictions", "Snapshots evicted from the prefix cache"),
            ("bytes", "Bytes the prefix cache holds"),
            ("entries", "Snapshots the prefix cache holds"),
            ("budget", "The prefix cache's budget in bytes (--prefix-cache)"))}

    # hooks the scheduler calls
    def token(self, seconds: float, first: bool) -> None:
        self.tokens.inc()
        (self.ttft if first else self.tpot).observe(seconds)

    def step(self, kind: str, seconds: float, n: int) -> None:
        self.steps.labels(kind).observe(seconds)
        if kind == "prefill":
            self.prompt_tokens.inc(n)

    def finished(self, reason: str) -> None:
        self.requests.labels(reason).inc()

    def rejected(self, n: int = 1) -> None:
        self.rejected_total.inc(n)

    def sample(self, sched) -> None:
        """Gauges from the scheduler's current state."""
        self.queue_depth.set(sched.queue_depth())
        free = sched.free_rows()
        self.free.set(free)
        self.active.set(sched.max_batch - free)
        self.max_batch.set(sched.max_batch)
        cache = getattr(sched, "cache", None)
        if cache is not None:
            for k, v in cache.metrics().items():
                self.cache[k].set(v)

    def render(self, sched=None) -> bytes:
        if sched is not None:
            self.sample(sched)
        return generate_latest(self.registry)


class HTTPMetrics:
    """ASGI middleware around everything else (the security guard included): counts every HTTP
    answer by status (``bsbr_http_responses_total``) and observes its latency from the request's
    arrival to the response's end (``bsbr_request_duration_seconds``). The ``Metrics`` are the
    application's server's (``app.state.server``), looked up when the answer ends, so a server
    started by the first request counts that request too. A request that ends without a status
    (an exception before any response) counts as 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            srv = getattr(getattr(scope.get("app"), "state", None), "server", None)
            if srv is not None:
                code = str(status[0] or 500)
                srv.metrics.http.labels(code).inc()
                srv.metrics.latency.labels(code).observe(time.perf_counter() - t0)
