"""Prometheus metrics (``prometheus_client``), one registry per app so tests and replicas stay apart."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """What the service exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mixllm_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("mixllm_request_duration_seconds", "HTTP request latency by route and status",
                                 ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("mixllm_batch_size", "Requests per model forward", ["model"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("mixllm_batch_seconds", "Duration of each model call (one batch)", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("mixllm_queue_depth", "Requests waiting for a model forward", ["model"],
                                 registry=self.registry)
        self.cache = Gauge("mixllm_item_cache_rows", "Rows of the item token cache (students) or catalog (others)",
                           ["model"], registry=self.registry)
        self.load_time = Gauge("mixllm_model_load_seconds", "Time to load each model", ["model"], registry=self.registry)
        self.first_token = Histogram("mixllm_chat_time_to_first_token_seconds", "Chat completions: from the request "
                                     "to its first generated text (queueing, image decoding, prefill)", ["model"],
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("mixllm_chat_tokens_total", "Chat completions: prompt and completion tokens",
                              ["model", "kind"], registry=self.registry)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)

    def batch(self, model: str, size: int, depth: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_seconds.labels(model).observe(seconds)
        self.queue_depth.labels(model).set(depth)

    def model_loaded(self, model: str, seconds: float) -> None:
        self.load_time.labels(model).set(seconds)

    def chat_first_token(self, model: str, seconds: float) -> None:
        self.first_token.labels(model).observe(seconds)

    def chat_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens.labels(model, "prompt").inc(prompt)
        self.tokens.labels(model, "completion").inc(completion)

    def cache_rows(self, catalog) -> None:
        for name, student in catalog.students.items():
            self.cache.labels(name).set(student.ranker.token_cache.num_rows)
        for name in catalog.teachers:
            self.cache.labels(name).set(len(catalog.texts))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
