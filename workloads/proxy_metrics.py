"""The P/D proxy's Prometheus series and the SSE token counting that feeds its TTFT/TPOT
histograms, kept apart from the request flow that records them."""

from __future__ import annotations

import contextlib

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 1 ms to 2 min: TTFT of a loaded server, TPOT of a fast one.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip


class ProxyMetrics:
    """Prometheus series of the proxy, in a registry of its own (several apps per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "copack_proxy_requests",
            "Requests answered by the proxy, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "copack_proxy_ttft_seconds",
            "Time from the request's arrival to the first byte of a streamed answer",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "copack_proxy_tpot_seconds",
            "Mean time between output tokens of a streamed answer",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "copack_proxy_request_duration_seconds",
            "Time from the request's arrival to the end of its answer",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill = Histogram(
            "copack_proxy_prefill_seconds",
            "Duration of the prefill step on a prefill backend",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "copack_proxy_backend_errors",
            "Failed calls to a backend, by kind (connect, timeout, http_5xx, protocol, stream)",
            ["backend", "role", "kind"],
            registry=r,
        )
        self.outstanding = Gauge(
            "copack_proxy_backend_outstanding_requests",
            "Requests in flight on a backend",
            ["backend", "role"],
            registry=r,
        )



class _StreamStats:
    """Counts the SSE events of a streamed answer to time its tokens without re-encoding it."""

    __slots__ = ("events", "first_at", "tail", "usage_tokens")

    def __init__(self) -> None:
        self.events = 0
        self.first_at: float | None = None
        self.tail = b""
        self.usage_tokens: int | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        if self.first_at is None:
            self.first_at = now
        data = self.tail + chunk
        parts = data.split(b"\n\n")
        self.tail = parts.pop()
        for event in parts:
            if not event.startswith(b"data:") or event.startswith(b"data: [DONE]"):
                continue
            self.events += 1
            if b'"usage":{' in event:
                with contextlib.suppress(orjson.JSONDecodeError):
                    usage = orjson.loads(event[5:]).get("usage") or {}
                    tokens = usage.get("completion_tokens")
                    if isinstance(tokens, int):
                        self.usage_tokens = tokens

    def tpot(self, end: float) -> float | None:
        """Up to the stream's end, as `copack workload replay` and vLLM's benchmark count it,
        so the proxy's histogram and a client's report measure the same thing."""
        tokens = self.usage_tokens if self.usage_tokens is not None else self.events
        if self.first_at is None or tokens < 2:
            return None
        return (end - self.first_at) / (tokens - 1)
