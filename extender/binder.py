"""Creating the pod's binding: the one write the extender makes to the cluster.

The unit choice travels *in the binding's metadata.annotations*: the API server merges them into
the pod in the same step as it sets spec.nodeName, so there is never a pod bound without its
unit, nor a pod annotated with a unit but left unbound (FACTS #1). The pod UID is a precondition,
so a pod deleted and re-created under the same name is never bound with the old one's choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import orjson
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException


class BindError(Exception):
    """The binding was not created; the message says what failed."""


class AlreadyBound(BindError):
    """The pod is already bound (a retried bind, or someone else bound it): where, and with which
    copack annotations, so a retry of our own earlier success can be answered as a success."""

    def __init__(self, message: str, node: str, annotations: dict[str, str]) -> None:
        super().__init__(message)
        self.node = node
        self.annotations = annotations


class BindUncertain(BindError):
    """The binding request failed in transit and the pod's state could not be read back: it
    may or may not be bound. The caller keeps its assumption (the watch settles it)."""


class NotLeader(BindError):
    """This replica does not hold the leader Lease (any more): it must not bind, since another
    replica may be placing pods on the same units. Nothing was sent to the API server."""


class Binder(Protocol):
    def bind(
        self, namespace: str, name: str, uid: str, node: str, annotations: dict[str, str]
    ) -> None:
        """Bind the pod to the node with the annotations, atomically; raise BindError."""


def _status_message(e: ApiException) -> str:
    try:
        body = orjson.loads(e.body or b"{}")
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except orjson.JSONDecodeError:
        pass
    return f"{e.status} {e.reason}"


class KubeBinder:
    """Creates `pods/binding` through the official client.

    With `lease_left` (extender/leader.py's LeaderElector.lease_left), each bind first checks
    that this replica still holds the leader Lease and caps the request's timeout to the time
    the Lease is still surely ours, so a binding either lands before a new leader can relist
    or is refused here, visibly."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        timeout_s: float = 4.0,
        lease_left: Callable[[], float] | None = None,
    ) -> None:
        self._core = k8s.CoreV1Api(api_client)
        self._timeout = timeout_s
        self._lease_left = lease_left

    def _budget(self, namespace: str, name: str) -> float:
        if self._lease_left is None:
            return self._timeout
        left = self._lease_left()
        if left <= 0.05:
            raise NotLeader(
                f"not binding {namespace}/{name}: this extender replica no longer holds the "
                "leader lease (another replica may be binding); kube-scheduler will retry"
            )
        return min(self._timeout, left)

    def bind(
        self, namespace: str, name: str, uid: str, node: str, annotations: dict[str, str]
    ) -> None:
        timeout = self._budget(namespace, name)
        body = k8s.V1Binding(
            metadata=k8s.V1ObjectMeta(
                name=name, namespace=namespace, uid=uid or None, annotations=annotations
            ),
            target=k8s.V1ObjectReference(api_version="v1", kind="Node", name=node),
        )
        try:
            # FACTS #1: the 201 answer is a v1 Status the typed call cannot read; take it raw.
            resp = self._core.create_namespaced_pod_binding(
                name, namespace, body, _preload_content=False, _request_timeout=timeout
            )
        except ApiException as e:
            if e.status == 409:
                self._explain_conflict(namespace, name, uid, e)
            raise BindError(
                f"creating the binding of {namespace}/{name} to {node} failed: "
                f"{_status_message(e)}"
            ) from None
        except Exception as e:  # connection reset, timeout: the POST may have gone through
            self._settle_transport_error(namespace, name, uid, node, e)
            return
        try:
            status = resp.status
            resp.read()  # drain: a pooled connection with an unread body breaks the next call
            resp.release_conn()
        except Exception:  # the body is a Status we do not need; the status code is in
            status = resp.status
        if not 200 <= status <= 299:
            raise BindError(f"creating the binding of {namespace}/{name}: HTTP {status}")

    def _settle_transport_error(
        self, namespace: str, name: str, uid: str, node: str, err: Exception
    ) -> None:
        """Read the pod back: bound here -> AlreadyBound (the caller adopts it); not bound ->
        BindError (safe to roll back); unreadable -> BindUncertain."""
        what = f"creating the binding of {namespace}/{name} to {node} failed: " \
               f"{type(err).__name__}: {err}"
        # bounded: the node's bind lock is held meanwhile, and kube-scheduler gives up after 5 s
        for _ in range(2):
            try:
                raw = self._core.read_namespaced_pod(
                    name, namespace, _preload_content=False,
                    _request_timeout=min(2.0, self._timeout),
                )
                pod = orjson.loads(raw.data)
                break
            except ApiException as e:
                if e.status == 404:
                    raise BindError(f"{what}; the pod is gone") from None
            except Exception:
                continue
        else:
            raise BindUncertain(f"{what}; whether the pod got bound is unknown") from None
        meta = pod.get("metadata") or {}
        bound = (pod.get("spec") or {}).get("nodeName")
        if bound and (not uid or meta.get("uid") == uid):
            ann = meta.get("annotations") or {}
            raise AlreadyBound(
                f"{namespace}/{name} is bound to {bound}", bound,
                {k: v for k, v in ann.items() if k.startswith("copack.io/")},
            )
        raise BindError(f"{what}; the pod is not bound")

    def _explain_conflict(self, namespace: str, name: str, uid: str, e: ApiException) -> None:
        """A 409: raise AlreadyBound when the same pod is bound, else let the caller report."""
        try:
            raw = self._core.read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=self._timeout
            )
            pod = orjson.loads(raw.data)
        except Exception:
            return
        if uid and pod.get("metadata", {}).get("uid") != uid:
            return
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            ann = pod.get("metadata", {}).get("annotations") or {}
            raise AlreadyBound(
                f"{namespace}/{name} is already bound to {node}", node,
                {k: v for k, v in ann.items() if k.startswith("copack.io/")},
            )
