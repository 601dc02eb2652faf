"""Wiring for `copack extender serve`: the Kubernetes client, the watchers, the telemetry
subscriber, the binder and the HTTP app, in one object with start/stop (tests start several in
one process, on loopback, and restart them)."""

from __future__ import annotations

import gc
import logging
import math
import signal
import socket
import threading
import time
from typing import Any

import orjson
import uvicorn
from kubernetes import client as k8s

from extender.app import create_app
from extender.binder import Binder, KubeBinder
from extender.config import ExtenderConfig
from extender.kube_watch import ClusterWatcher, kube_client
from extender.leader import LeaderElector
from extender.role_label import RoleLabeler
from extender.state import ClusterState
from extender.telemetry import TelemetrySubscriber

log = logging.getLogger("copack.extender")


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _rv_int(rv: str | None) -> int | None:
    try:
        return int(rv) if rv else None
    except ValueError:
        return None


class _Leadership:
    """Leader = holds the Lease *and* has relisted the pods since it took it: a new leader first
    rebuilds, from what the API server holds (spec.nodeName and the copack.io/unit annotations),
    every placement, including those the old leader's last binds made."""

    def __init__(self, service: ExtenderService, elector: LeaderElector) -> None:
        self._svc = service
        self.elector = elector
        self.ready_term = 0  # the term whose relist is done

    def is_leader(self) -> bool:
        return self.elector.holds_lease() and self.ready_term == self.elector.term

    def standby_reason(self) -> str:
        e = self.elector
        if e.holds_lease():
            return "leader; rebuilding the cluster state from the API server"
        leader = e.leader()
        return f"standby; leader is {leader}" if leader else "standby; no leader known"

    def started_leading(self, term: int) -> None:
        """In its own thread: relist (retrying) until done or leadership is gone again."""
        backoff = 0.1
        while self.elector.term == term and self.elector.holds_lease():
            try:
                self._svc.relist_pods()
                self.ready_term = term
                log.info("leader (term %d): state rebuilt, answering the verbs", term)
                return
            except Exception as e:
                log.warning("relist after acquiring the lease failed: %s: %s",
                            type(e).__name__, e)
                time.sleep(backoff)
                backoff = min(2.0, backoff * 2)


class ExtenderService:
    """Everything `serve` runs. `start()` returns once the HTTP port listens (not once synced:
    /readyz says that); `stop()` undoes it all."""

    def __init__(
        self,
        config: ExtenderConfig,
        api_client: k8s.ApiClient | None = None,
        binder: Binder | None = None,
        **state_kwargs: Any,
    ) -> None:
        self.config = config
        self._own_client = api_client is None
        self.api_client = api_client or kube_client(config.kube.kubeconfig)
        self.state = ClusterState(
            config.policy_config(),
            telemetry_statistic=config.telemetry.statistic,
            bind_confirm_timeout_s=config.kube.bind_confirm_timeout_s,
            explain_entries=config.limits.explain_entries,
            **state_kwargs,
        )
        le = config.leader_election
        self.elector: LeaderElector | None = None
        self.leadership: _Leadership | None = None
        if le.enabled:
            self.elector = LeaderElector(
                self.api_client, name=le.lease_name, namespace=le.lease_namespace,
                identity=le.resolved_identity(), lease_duration_s=le.lease_duration_s,
                renew_deadline_s=le.renew_deadline_s, retry_period_s=le.retry_period_s,
                on_started_leading=lambda term: self._started_leading(term),
            )
            self.leadership = _Leadership(self, self.elector)
        self.binder = binder or KubeBinder(
            self.api_client, timeout_s=config.kube.bind_timeout_s,
            lease_left=self.elector.lease_left if self.elector else None,
        )
        self.watcher = ClusterWatcher(
            self.api_client,
            self.state,
            watch_timeout_s=config.kube.watch_timeout_s,
            backoff_initial_s=config.kube.backoff_initial_s,
            backoff_max_s=config.kube.backoff_max_s,
            pod_field_selector=config.kube.pod_field_selector,
        )
        self.telemetry = (
            TelemetrySubscriber(
                self.state, config.telemetry.backoff_initial_s, config.telemetry.backoff_max_s,
                snapshots_per_s=config.telemetry.snapshots_per_s,
            )
            if config.telemetry.enabled
            else None
        )
        self.app = create_app(self.state, config, self.binder, self.leadership)
        pod_ns = le.resolved_pod_namespace()
        self.labeler = (
            RoleLabeler(
                self.api_client, le.resolved_identity(), pod_ns,
                lambda: self.state.synced and self.is_leader(), le.retry_period_s,
            )
            if pod_ns is not None
            else None
        )
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._stopped = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._port is not None, "not started"
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls.enabled else "http"
        host = self.config.listen.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"

    def _uvicorn(self) -> uvicorn.Server:
        tls = self.config.tls
        cfg = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=tls.cert_file,
            ssl_keyfile=tls.key_file,
            timeout_keep_alive=120,
            # An idle TLS keep-alive connection (kube-scheduler holds one) keeps uvicorn's
            # graceful shutdown waiting for the client's close_notify, 30 s by default: give
            # in-flight verbs the longest one's time (a bind) and then go.
            timeout_graceful_shutdown=math.ceil(self.config.kube.bind_timeout_s) + 1,
        )
        return uvicorn.Server(cfg)

    def _started_leading(self, term: int) -> None:
        if self.leadership is not None:
            self.leadership.started_leading(term)

    def is_leader(self) -> bool:
        """Whether this replica answers the verbs (always, without leader election)."""
        return self.leadership is None or self.leadership.is_leader()

    def relist_pods(self, wait_watch_s: float = 5.0) -> None:
        """List the pods now and make the state match (the watch keeps running), then wait
        (bounded) until the pod watch has caught up with that list, so no older event it
        still has to deliver can undo a placement the list showed."""
        while not self.state.synced:  # the watchers' first lists come first
            if self._stopped.wait(0.05):
                return
        core = k8s.CoreV1Api(self.api_client)
        selector = self.config.kube.pod_field_selector
        started = self.state.now()
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": 5000, "_preload_content": False,
                                      "_request_timeout": 60}
            if selector:
                kwargs["field_selector"] = selector
            if cont:
                kwargs["_continue"] = cont
            body = orjson.loads(core.list_pod_for_all_namespaces(**kwargs).data)
            items.extend(body.get("items") or [])
            cont = (body.get("metadata") or {}).get("continue")
            if not cont:
                break
        self.state.replace_pods(items, started)
        # the newest pod change the list showed (not the list's own resourceVersion: that
        # counts every object kind, Leases included, and a pod watch may not reach it for long)
        rvs = [_rv_int((p.get("metadata") or {}).get("resourceVersion")) for p in items]
        target = max((r for r in rvs if r is not None), default=None)
        deadline = time.monotonic() + wait_watch_s
        while target is not None and time.monotonic() < deadline:
            seen = _rv_int(self.watcher.pods.resource_version)
            if seen is None or seen >= target:
                break
            time.sleep(0.01)

    def _start_background(self) -> None:
        self.watcher.start()
        if self.elector is not None:
            self.elector.start()
        if self.labeler is not None:
            self.labeler.start()
        if self.telemetry is not None:
            self.telemetry.start()
        threading.Thread(target=self._freeze_after_sync, name="copack-gc-freeze",
                         daemon=True).start()

    def _freeze_after_sync(self) -> None:
        """Once the initial lists are in, move the (large, long-lived) cluster state out of
        the cyclic GC's reach: full collections would otherwise walk ~10^6 objects at 5,000
        nodes and show up as latency spikes on the verbs."""
        while not self._stopped.wait(0.1):
            if self.state.synced:
                gc.collect()
                gc.freeze()
                return

    def start(self) -> ExtenderService:
        """Serve in a background thread (tests, benchmarks)."""
        self._sock = _listen_socket(self.config.listen.host, self.config.listen.port)
        self._port = self._sock.getsockname()[1]
        self._start_background()
        self._server = self._uvicorn()
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True,
            name="copack-extender-http",
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the extender's HTTP server did not start")
            time.sleep(0.01)
        return self

    def run(self) -> None:
        """Serve in the foreground until SIGINT/SIGTERM (the CLI)."""
        self._sock = _listen_socket(self.config.listen.host, self.config.listen.port)
        self._port = self._sock.getsockname()[1]
        self._start_background()
        self._server = self._uvicorn()
        log.info("copack extender listening on %s", self.url)

        def _exit(signum: int, frame: Any) -> None:
            raise SystemExit(0)

        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal: end with
        # status 0 after stopping the watchers instead of dying by the signal
        signal.signal(signal.SIGTERM, _exit)
        signal.signal(signal.SIGINT, _exit)
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._stop_background()

    def _stop_background(self, release_lease: bool = True) -> None:
        self._stopped.set()
        if self.labeler is not None:  # the Service moves on before the Lease is released
            self.labeler.stop(relabel=release_lease)
        if self.elector is not None:
            self.elector.stop(release=release_lease)
        if self.telemetry is not None:
            self.telemetry.stop()
        self.watcher.stop()
        if self._own_client:
            self.api_client.close()
        if self._sock is not None:
            self._sock.close()

    def stop(self, release_lease: bool = True) -> None:
        """Stop serving; `release_lease=False` leaves the Lease to expire, as a crash would."""
        if self.elector is not None and not release_lease:
            self.elector.stop(release=False)  # no renewals from here on, as after a crash
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._stop_background(release_lease)
