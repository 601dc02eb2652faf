"""The rebalancer's calls to the Kubernetes API, and nothing else: mark a node's units draining,
evict a pod through policy/v1 Eviction, read PodDisruptionBudgets. (RBAC in
deploy/base/rebalancer-rbac.yaml grants exactly these; tests/deploy checks it.)

Raw JSON (`_preload_content=False`) as in extender/kube_watch.py: the answers are read only for
their status, and an Eviction answers with a v1 Status, not an Eviction (cf. FACTS #1)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from policies.draining import DRAINING_ANNOTATION, format_draining


@dataclass(frozen=True)
class Eviction:
    outcome: str  # "evicted" | "refused" (429: a PDB said no) | "failed"
    message: str


@dataclass(frozen=True)
class Pdb:
    """A policy/v1 PodDisruptionBudget, as far as the budget check needs it."""

    name: str
    selector: Mapping[str, Any] | None
    min_available: int | str | None
    max_unavailable: int | str | None
    disruptions_allowed: int
    expected_pods: int | None

    @classmethod
    def from_k8s(cls, obj: Mapping[str, Any]) -> Pdb:
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        return cls(
            name=(obj.get("metadata") or {}).get("name", ""),
            selector=spec.get("selector"),
            min_available=spec.get("minAvailable"),
            max_unavailable=spec.get("maxUnavailable"),
            disruptions_allowed=int(status.get("disruptionsAllowed") or 0),
            expected_pods=status.get("expectedPods"),
        )

    def matches(self, labels: Mapping[str, str]) -> bool:
        """metav1.LabelSelector semantics: {} selects every pod, null none."""
        sel = self.selector
        if not isinstance(sel, Mapping):
            return False
        if any(labels.get(k) != v for k, v in (sel.get("matchLabels") or {}).items()):
            return False
        for e in sel.get("matchExpressions") or []:
            key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
            if (
                (op == "In" and labels.get(key) not in values)
                or (op == "NotIn" and key in labels and labels[key] in values)
                or (op == "Exists" and key not in labels)
                or (op == "DoesNotExist" and key in labels)
            ):
                return False
        return True

    def floor(self, pods: int) -> int:
        """Pods that must stay available (minAvailable, or what maxUnavailable leaves) out of
        `pods` (the PDB's expectedPods when the controller reported it)."""
        total = self.expected_pods if isinstance(self.expected_pods, int) else pods
        if self.min_available is not None:
            return _resolve(self.min_available, total, up=True)
        if self.max_unavailable is not None:
            return max(0, total - _resolve(self.max_unavailable, total, up=True))
        return 0


def _resolve(v: int | str, total: int, up: bool) -> int:
    if isinstance(v, str) and v.endswith("%"):
        x = float(v[:-1]) / 100 * total
        return math.ceil(x) if up else math.floor(x)
    return int(v)


class KubeActions:
    """The three calls, on one ApiClient."""

    def __init__(self, api_client: k8s.ApiClient, timeout_s: float = 10.0) -> None:
        self.core = k8s.CoreV1Api(api_client)
        self.policy = k8s.PolicyV1Api(api_client)
        self.timeout_s = timeout_s

    def set_draining(self, node: str, units: Sequence[str], until: float) -> None:
        """Write (or, with no units, remove) the node's `copack.io/draining` annotation.
        A dict body is a strategic-merge patch (FACTS #2); null deletes the key."""
        value = format_draining(units, until) if units else None
        self.core.patch_node(
            node, {"metadata": {"annotations": {DRAINING_ANNOTATION: value}}},
            _preload_content=False, _request_timeout=self.timeout_s,
        )

    def evict(self, namespace: str, name: str, uid: str) -> Eviction:
        """POST pods/{name}/eviction with the pod's UID as precondition (a same-named
        replacement is never evicted by mistake)."""
        body = k8s.V1Eviction(
            api_version="policy/v1",
            kind="Eviction",
            metadata=k8s.V1ObjectMeta(name=name, namespace=namespace),
            delete_options=k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(uid=uid)),
        )
        try:
            resp = self.core.create_namespaced_pod_eviction(
                name, namespace, body, _preload_content=False, _request_timeout=self.timeout_s
            )
        except ApiException as e:
            outcome = "refused" if e.status == 429 else "failed"
            return Eviction(outcome, f"HTTP {e.status}: {_status_message(e.body) or e.reason}")
        return Eviction("evicted", f"HTTP {resp.status}")

    def pdbs(self, namespace: str) -> list[Pdb]:
        resp = self.policy.list_namespaced_pod_disruption_budget(
            namespace, _preload_content=False, _request_timeout=self.timeout_s
        )
        return [Pdb.from_k8s(o) for o in orjson.loads(resp.data).get("items") or []]


def _status_message(body: Any) -> str:
    """The message of a v1 Status answer, with its causes (a PDB's own words)."""
    try:
        st = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return str(body)[:200]
    if not isinstance(st, dict):
        return ""
    causes = [c.get("message", "") for c in (st.get("details") or {}).get("causes") or []
              if isinstance(c, dict)]
    return "; ".join([st.get("message", ""), *causes]).strip("; ")
