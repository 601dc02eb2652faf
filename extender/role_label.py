"""The label that routes kube-scheduler to the leading replica: `copack.io/extender-role`.

Every replica is Ready once its state is warm, so a PodDisruptionBudget counts both and a
drain may evict either (the survivor takes over). The Service selects
`copack.io/extender-role=leader` on top of the app label: each replica keeps the label on its
own pod equal to what it is now (leader once it holds the Lease and has relisted, else
standby), checked every period and re-patched after any failure. A crashed leader cannot clear
its label; until its container restarts (a replica's first write is `standby`) or its pod is
gone, calls that reach it fail (connection refused) as they would without it, and it never
binds (no Lease)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kubernetes import client as k8s

log = logging.getLogger("copack.extender.leader")

ROLE_LABEL = "copack.io/extender-role"


class RoleLabeler:
    def __init__(
        self,
        api_client: k8s.ApiClient,
        pod_name: str,
        namespace: str,
        is_leader: Callable[[], bool],
        period_s: float,
        timeout_s: float = 5.0,
    ) -> None:
        self._api = k8s.CoreV1Api(api_client)
        self.pod_name = pod_name
        self.namespace = namespace
        self._is_leader = is_leader
        self.period_s = period_s
        self.timeout_s = timeout_s
        self.applied: str | None = None  # the role last written successfully
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _patch(self, role: str) -> bool:
        try:
            self._api.patch_namespaced_pod(
                self.pod_name, self.namespace, {"metadata": {"labels": {ROLE_LABEL: role}}},
                _request_timeout=self.timeout_s,
            )
        except Exception as e:  # retried at the next period; never fatal
            self.failures += 1
            log.warning("cannot label pod %s/%s %s=%s: %s: %s", self.namespace, self.pod_name,
                        ROLE_LABEL, role, type(e).__name__, e)
            return False
        self.applied = role
        return True

    def sync(self) -> None:
        """Bring the label in line with the role now (a no-op when it already is)."""
        role = "leader" if self._is_leader() else "standby"
        if role != self.applied and self._patch(role) and role == "leader":
            log.info("pod %s/%s labelled %s=leader: the Service routes here",
                     self.namespace, self.pod_name, ROLE_LABEL)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sync()
            self._stop.wait(self.period_s)

    def start(self) -> RoleLabeler:
        self._thread = threading.Thread(target=self._run, name="copack-role-label", daemon=True)
        self._thread.start()
        return self

    def stop(self, relabel: bool = True) -> None:
        """Stop syncing and, with `relabel`, leave the pod labelled standby (a graceful stop
        hands the Service over before the Lease is released; a crash leaves it as it was)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + self.period_s)
        if relabel and self.applied != "standby":
            self._patch("standby")
