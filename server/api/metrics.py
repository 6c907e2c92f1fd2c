"""Prometheus metrics: one registry per app (so tests can run several apps in one process).

TGI's names, exactly as its exporter writes them (counters without ``_total``): tgi_request_count,
tgi_request_success, tgi_request_failure{err}, the tgi_request_*_duration / generated_tokens /
input_length / max_new_tokens histograms, tgi_queue_size, tgi_batch_current_size,
tgi_batch_current_max_tokens. deltahub's own series, per variant: requests, generated tokens,
cold loads, load seconds, tier; and KV-cache blocks, read from ``engine.stats()`` at scrape time.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class _TgiCounters:
    """TGI's counters under their exact names (``# TYPE ... untyped``: prometheus_client would
    append ``_total`` to a counter)."""

    HELP = {"tgi_request_count": "Total number of requests received",
            "tgi_request_success": "Total number of successful requests",
            "tgi_request_failure": "Total number of failed requests, labeled by error type"}

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = defaultdict(float)

    def inc(self, name: str, labels: tuple = (), by: float = 1.0) -> None:
        with self._lock:
            self._values[(name, labels)] += by

    def collect(self):
        with self._lock:
            items = sorted(self._values.items())
        for name, doc in self.HELP.items():
            m = Metric(name, doc, "unknown")
            for (n, labels), v in items:
                if n == name:
                    m.add_sample(name, dict(labels), v)
            yield m


class _EngineCollector:
    """Gauges and per-variant series read from the engine when /metrics is scraped."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self):
        stats = self.m.engine_stats() or {}
        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value or 0))
            return g

        yield gauge("tgi_queue_size", "Current size of the request queue", stats.get("queue_size", 0))
        yield gauge("tgi_batch_current_size", "Current batch size", stats.get("running", 0))
        yield gauge("tgi_batch_current_max_tokens", "Maximum tokens for the current batch",
                    stats.get("batch_tokens", 0))
        yield gauge("deltahub_kv_blocks_used", "KV-cache blocks in use", stats.get("kv_blocks_used", 0))
        yield gauge("deltahub_kv_blocks_free", "KV-cache blocks free", stats.get("kv_blocks_free", 0))
        yield gauge("deltahub_requests_in_flight", "HTTP requests being served", self.m.in_flight)

        with self.m.lock:
            requests = dict(self.m.variant_requests)
            generated = dict(self.m.variant_tokens)
        per = stats.get("variants") or {}
        req = CounterMetricFamily("deltahub_variant_requests", "Requests per variant", labels=["variant"])
        tok = CounterMetricFamily("deltahub_variant_generated_tokens", "Generated tokens per variant",
                                  labels=["variant"])
        for name in sorted(set(requests) | set(generated)):
            req.add_metric([name], requests.get(name, 0))
            tok.add_metric([name], generated.get(name, 0))
        cold = CounterMetricFamily("deltahub_variant_cold_loads", "Variant loads from disk/Hub",
                                   labels=["variant"])
        secs = CounterMetricFamily("deltahub_variant_load_seconds", "Seconds spent loading a variant",
                                   labels=["variant"])
        tier = GaugeMetricFamily("deltahub_variant_tier", "1 for the tier a variant is in now",
                                 labels=["variant", "tier"])
        occupancy: dict[str, int] = defaultdict(int)
        for name, v in sorted(per.items()):
            cold.add_metric([name], float(v.get("cold_loads", 0) or 0))
            secs.add_metric([name], float(v.get("load_seconds", 0.0) or 0.0))
            if v.get("tier"):
                tier.add_metric([name, str(v["tier"])], 1.0)
                occupancy[str(v["tier"])] += 1
        occ = GaugeMetricFamily("deltahub_tier_occupancy", "Variants held in each tier", labels=["tier"])
        for t, n in sorted(occupancy.items()):
            occ.add_metric([t], n)
        yield from (req, tok, cold, secs, tier, occ)


class Metrics:
    """The app's registry. Routes call ``request_*``; the engine is read at scrape time."""

    def __init__(self, engine_stats):
        self.engine_stats = engine_stats
        self.registry = CollectorRegistry(auto_describe=False)
        self.lock = threading.Lock()
        self.counters = _TgiCounters()
        self.in_flight = 0
        self.variant_requests: dict[str, int] = defaultdict(int)
        self.variant_tokens: dict[str, int] = defaultdict(int)
        self.registry.register(self.counters)
        self.registry.register(_EngineCollector(self))

        def hist(name, doc, buckets):
            return Histogram(name, doc, buckets=buckets, registry=self.registry)

        self.duration = hist("tgi_request_duration", "Total time of a request (s)", _DURATION_BUCKETS)
        self.validation = hist("tgi_request_validation_duration", "Validation time (s)", _DURATION_BUCKETS)
        self.queue = hist("tgi_request_queue_duration", "Time in queue (s)", _DURATION_BUCKETS)
        self.inference = hist("tgi_request_inference_duration", "Inference time (s)", _DURATION_BUCKETS)
        self.per_token = hist("tgi_request_mean_time_per_token_duration", "Mean time per token (s)",
                              _DURATION_BUCKETS)
        self.generated = hist("tgi_request_generated_tokens", "Generated tokens per request", _TOKEN_BUCKETS)
        self.input_length = hist("tgi_request_input_length", "Prompt tokens per request", _TOKEN_BUCKETS)
        self.max_new_tokens = hist("tgi_request_max_new_tokens", "max_new_tokens per request", _TOKEN_BUCKETS)

    def request_received(self, variant: str) -> None:
        self.counters.inc("tgi_request_count")
        with self.lock:
            self.variant_requests[variant] += 1

    def request_failed(self, err: str) -> None:
        self.counters.inc("tgi_request_failure", (("err", err),))

    def request_succeeded(self, variant: str, *, total: float, validation: float, queue: float,
                          inference: float, generated_tokens: int) -> None:
        self.counters.inc("tgi_request_success")
        self.duration.observe(total)
        self.validation.observe(validation)
        self.queue.observe(queue)
        self.inference.observe(inference)
        self.per_token.observe(inference / max(generated_tokens, 1))
        self.generated.observe(generated_tokens)

    def tokens_generated(self, variant: str, n: int) -> None:
        with self.lock:
            self.variant_tokens[variant] += n

    def render(self) -> bytes:
        return generate_latest(self.registry)
