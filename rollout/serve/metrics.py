"""The server's Prometheus metrics (`GET /metrics`, text format), on a registry of its own per server.

Counters: requests by endpoint and status, generated tokens, row forwards (one per row per engine pass), cancelled
choices. Gauges: queue depth (choices waiting for a slot), active rows, batch occupancy (active rows / max_batch),
tokens/s over the last `window_s` seconds, tokens per forward since start, the policy version. A histogram of
request latency.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Count:
    """A Prometheus counter that also keeps its value for the derived gauges."""

    def __init__(self, counter: Counter):
        self.counter, self.value = counter, 0

    def inc(self, n: int = 1) -> None:
        self.counter.inc(n)
        self.value += n


class ServeMetrics:
    def __init__(self, window_s: float = 10.0):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("blockrl_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "blockrl_request_latency_seconds",
            "request latency (streams: until the last chunk)",
            ["endpoint"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.tokens = _Count(Counter("blockrl_generated_tokens", "tokens generated", registry=r))
        self.forwards = _Count(Counter("blockrl_row_forwards", "rows x engine passes", registry=r))
        self.cancelled = _Count(
            Counter("blockrl_cancelled_choices", "choices cancelled by clients", registry=r)
        )
        self.queue_depth = Gauge("blockrl_queue_depth", "choices waiting for a batch slot", registry=r)
        self.active_rows = Gauge("blockrl_active_rows", "rows decoding now", registry=r)
        self.occupancy = Gauge("blockrl_batch_occupancy", "active rows / max_batch", registry=r)
        self.tokens_per_s = Gauge(
            "blockrl_tokens_per_second", f"tokens/s over the last {window_s:g}s", registry=r
        )
        self.tokens_per_forward = Gauge(
            "blockrl_tokens_per_forward", "tokens per row forward since start", registry=r
        )
        self.policy_version = Gauge("blockrl_policy_version", "policy version now serving", registry=r)
        self.window_s = window_s
        self._history: deque[tuple[float, int]] = deque([(time.perf_counter(), 0)])

    def tick(self) -> None:
        """Update the derived gauges (the engine thread calls it every loop)."""
        now = time.perf_counter()
        self._history.append((now, self.tokens.value))
        while len(self._history) > 2 and self._history[1][0] < now - self.window_s:
            self._history.popleft()
        t0, n0 = self._history[0]
        self.tokens_per_s.set((self.tokens.value - n0) / max(now - t0, 1e-9))
        if self.forwards.value:
            self.tokens_per_forward.set(self.tokens.value / self.forwards.value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
