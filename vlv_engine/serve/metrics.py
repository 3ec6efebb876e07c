"""Prometheus metrics of one service instance (its own registry: two apps in one
process, as in the tests, never share or clash)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_KNOWN_PATHS = frozenset({"/v1/caption", "/healthz", "/readyz", "/metrics"})


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vlv_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.latency = Histogram("vlv_request_latency_seconds", "HTTP request latency by path", ["path"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size})
        self.batch_size = Histogram("vlv_batch_size", "images per model batch",
                                    buckets=[s for s in sizes if s <= max_batch_size], registry=r)
        self.batch_seconds = Histogram("vlv_batch_seconds", "model time per batch", buckets=_LATENCY_BUCKETS,
                                       registry=r)
        self.queue_depth = Gauge("vlv_queue_depth", "images waiting for the model", registry=r)
        self.images = Counter("vlv_images_captioned", "images captioned", registry=r)
        self.failures = Counter("vlv_image_failures", "images not captioned, by reason", ["reason"], registry=r)
        self.request_errors = Counter("vlv_request_errors", "requests refused as a whole, by reason", ["reason"],
                                      registry=r)
        self.in_flight = Gauge("vlv_requests_in_flight", "HTTP requests being answered", registry=r)
        self.ready = Gauge("vlv_ready", "1 when the model is loaded and warmed", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP response by status and times it."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        path = path if path in _KNOWN_PATHS else "other"  # bounded label values
        status = {"code": 500}
        started = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)
            self.metrics.requests.labels(path, str(status["code"])).inc()
