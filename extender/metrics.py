"""Prometheus metrics of the extender, on a registry of its own per app (several apps can live
in one process: tests, the simulator).

Request latency and decision outcomes are counted as they happen; everything read from the
cluster state (units by state, telemetry age per node, counters kept by the watchers) is
computed at scrape time, so the hot path pays nothing for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from extender.state import ClusterState

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


class _StateCollector(Collector):
    def __init__(self, state: ClusterState) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._state
        with s.lock:
            now = s.now()
            stale_after = s.policy.stale_after_s
            units = GaugeMetricFamily(
                "copack_extender_units", "Units in the cluster view by state", labels=["state"]
            )
            for state_name, count in s.unit_states().items():
                units.add_metric([state_name], float(count))
            occupied = GaugeMetricFamily(
                "copack_extender_units_occupied", "Units holding at least one pod"
            )
            occupied.add_metric([], float(s.occupied_units()))
            age = GaugeMetricFamily(
                "copack_extender_telemetry_age_seconds",
                "Seconds since the node agent's last telemetry snapshot arrived",
                labels=["node"],
            )
            stale = GaugeMetricFamily(
                "copack_extender_telemetry_stale",
                "1 when the node's telemetry is older than the staleness bound (declared "
                "demand only)",
                labels=["node"],
            )
            for node in sorted(s.nodes):
                info = s.nodes[node]
                if not info.has_inventory:
                    continue
                a = s.telemetry_age(node, now)
                if a is not None:
                    age.add_metric([node], a)
                stale.add_metric([node], 1.0 if a is None or a > stale_after else 0.0)
            synced = GaugeMetricFamily(
                "copack_extender_synced", "1 once the cluster state has synced"
            )
            synced.add_metric([], 1.0 if s.synced else 0.0)
            pods = GaugeMetricFamily(
                "copack_extender_pods", "copack pods known to the extender", labels=["source"]
            )
            by_source = {"watch": 0, "bind": 0, "unplaced": 0}
            for p in s.pods.values():
                if not p.unit:
                    by_source["unplaced"] += 1
                else:
                    by_source[p.source] += 1
            for k, c in by_source.items():
                pods.add_metric([k], float(c))
            restarts = CounterMetricFamily(
                "copack_extender_watch_restarts",
                "Restarts of the Kubernetes watches by resource and reason",
                labels=["resource", "reason"],
            )
            reconnects = CounterMetricFamily(
                "copack_extender_telemetry_reconnects",
                "Telemetry stream reconnections by node",
                labels=["node"],
            )
            for (name, label), count in sorted(s.counters.items()):
                if name == "watch_restarts":
                    res, _, why = label.partition(":")
                    restarts.add_metric([res, why], float(count))
                elif name == "telemetry_reconnects":
                    reconnects.add_metric([label], float(count))
        yield from (units, occupied, age, stale, synced, pods, restarts, reconnects)


class _LeaderCollector(Collector):
    def __init__(self, is_leader: Callable[[], bool] | None) -> None:
        self._is_leader = is_leader

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "copack_extender_leader",
            "1 while this replica answers the verbs and binds (holds the leader lease and has "
            "rebuilt its state; always 1 without leader election), 0 on a standby",
        )
        g.add_metric([], 1.0 if self._is_leader is None or self._is_leader() else 0.0)
        yield g


class ExtenderMetrics:
    def __init__(self, state: ClusterState,
                 is_leader: Callable[[], bool] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram(
            "copack_extender_request_duration_seconds",
            "Time to answer a kube-scheduler extender call",
            ["verb"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "copack_extender_decisions",
            "Extender answers by verb and outcome",
            ["verb", "outcome"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(state))
        self.registry.register(_LeaderCollector(is_leader))
        # children resolved once: labels() costs a dict lookup + lock per call
        self._lat = {v: self.latency.labels(v) for v in ("filter", "prioritize", "bind")}

    def observe(self, verb: str, seconds: float, outcome: str) -> None:
        self._lat[verb].observe(seconds)
        self.decisions.labels(verb, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
