"""An in-repo fake Kubernetes API server (core/v1 Nodes, Pods and Secrets) over real HTTP on
loopback.

No kube-apiserver binary can be had on these machines, yet copack's extender, agent and device
plugin must be tested through the *official* `kubernetes` Python client, quirks included
(see FACTS.md). This server speaks enough of the real wire protocol for that client:

Endpoints (JSON only, HTTP/1.1 keep-alive, TCP_NODELAY):
  GET    /api/v1/nodes | /api/v1/pods | /api/v1/namespaces/NS/pods        list, watch (?watch=1)
  GET    /api/v1/nodes/N | /api/v1/namespaces/NS/pods/P                     get
  POST   /api/v1/nodes | /api/v1/namespaces/NS/pods                         create
  PUT    .../nodes/N | .../pods/P   (and /status)                           replace
  PATCH  .../nodes/N | .../pods/P   (and /status)                           patch
  DELETE .../nodes/N | .../pods/P                                           delete (immediate)
  POST   /api/v1/namespaces/NS/pods/P/binding                               bind (201 + v1 Status)
  the same verbs for /api/v1/namespaces/NS/secrets[/S] (no subresources)
  GET|POST|PUT|PATCH|DELETE /apis/coordination.k8s.io/v1/namespaces/NS/leases[/L]  Leases
                           (resourceVersion precondition -> 409; MicroTime fields checked)
  GET    /version, /healthz, /readyz, /api, /api/v1                         discovery odds and ends

Semantics kept from the real server:
- One global, increasing resourceVersion; list answers carry it in `metadata.resourceVersion`;
  list items carry no `kind`/`apiVersion` (get answers and watch objects do).
- labelSelector (`a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`), fieldSelector
  (pods: metadata.name, metadata.namespace, spec.nodeName, spec.schedulerName, status.phase, ...;
  nodes: metadata.name, spec.unschedulable), `limit`/`continue` paging.
- watch: chunked JSON lines, ADDED/MODIFIED/DELETED, BOOKMARK when `allowWatchBookmarks=true`
  (every `bookmark_interval_s`, or on `send_bookmark()`). resourceVersion "" or "0" starts with
  synthetic ADDED events for the current objects; a resourceVersion older than the retained
  history gets an in-stream `ERROR` event with a 410 `Expired` Status (as the real server does; the
  client then retries once and raises `ApiException(410)`, FACTS #3). Objects moving in or out of
  a selector are sent as ADDED/DELETED. `timeoutSeconds` ends the stream cleanly.
- Patch: `application/strategic-merge-patch+json` (dict body; lists with Kubernetes merge keys
  such as containers/name are merged, `null` deletes), `application/merge-patch+json` (RFC 7386),
  `application/json-patch+json` (RFC 6902 list; `~1` escapes `/`). Main-resource writes cannot
  change `status`, `/status` writes only change `status`. A pod's spec is immutable except
  container images, activeDeadlineSeconds and tolerations: changing `spec.nodeName` (or any other
  field) answers 422 Invalid. `metadata.resourceVersion` / `metadata.uid` in a body are
  preconditions (409 Conflict). A write that changes nothing keeps the resourceVersion and sends
  no event.
- Binding: 409 when the pod is already bound or the binding's `metadata.uid` (UID precondition)
  does not match; otherwise sets `spec.nodeName`, adds the PodScheduled condition and merges the
  binding's `metadata.annotations` into the pod, all in one step; answers 201 with a v1 Status.
- Errors are v1 Status objects with the real reasons (NotFound, AlreadyExists, Conflict,
  Invalid, BadRequest, Expired, Gone, ...).

Test knobs (all thread-safe):
  server = FakeKubeApiServer(history_limit=10_000, bookmark_interval_s=None,
                             watch_timeout_s=1800, token=None)
  server.start() / server.stop()  (also a context manager); server.url; server.port
  server.write_kubeconfig(path) -> Path          kubeconfig for kubernetes.config.*
  server.drop_watches()            abort every open watch mid-stream (client: ProtocolError)
  server.expire_history(kick_watchers=False)
                                   forget all history: any watch from an older resourceVersion
                                   gets 410; with kick_watchers, open watches get ERROR 410 too
  server.send_bookmark()           BOOKMARK now on every watch that allows them
  server.fail_next(verb, count=1, status=500, resource=None, subresource=None, reason=None,
                   message=None, delay_s=0.0, drop=False, drop_after=False)
                                   the next `count` matching requests fail with `status` (or only
                                   wait `delay_s` then proceed when status is None, or have their
                                   connection dropped with no answer when drop=True, or are
                                   carried out but lose their answer when drop_after=True).
                                   verb: get|list|watch|create|update|patch|delete, or "bind"
                                   (= create pods/binding), or "*"
  server.requests                  list[RecordedRequest] of every request (method, path, query,
                                   verb, resource, subresource, namespace, name, content_type,
                                   body, status, user_agent, authorization): RBAC coverage tests
  server.clear_requests(); server.requests_matching(verb=None, resource=None, subresource=None)
  server.open_watches(resource=None) -> int; server.wait_for_watches(n, resource=None, timeout)
  server.resource_version -> int
Direct store access (no HTTP, same semantics and events as the HTTP verbs):
  server.create(resource, obj, namespace=None) -> dict
  server.add_node(name, labels=None, annotations=None, allocatable=None) -> dict
  server.add_pod(pod) -> dict      (namespace from pod.metadata.namespace, default "default")
  server.get(resource, name, namespace=None) -> dict | None        (a deep copy)
  server.list(resource, namespace=None) -> list[dict]
  server.patch(resource, name, patch, namespace=None, patch_type="strategic", subresource=None)
  server.delete(resource, name, namespace=None) -> dict
  server.bind(namespace, name, node, uid=None, annotations=None) -> None
  server.set_pod_phase(namespace, name, phase) -> dict

The fixture in `tests/fakes/kube_fixtures.py` starts one per test and yields
`FakeKube(server, kubeconfig, api_client)`.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import re
import select
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
import yaml

__all__ = [
    "ApiError",
    "FakeKubeApiServer",
    "RecordedRequest",
]

MAX_BODY_BYTES = 3 * 1024 * 1024  # the real server's request size limit

# resource -> (kind, namespaced)
RESOURCES: dict[str, tuple[str, bool]] = {
    "pods": ("Pod", True),
    "nodes": ("Node", False),
    "secrets": ("Secret", True),  # the dev overlay's TLS bootstrap writes one
}

FIELD_SELECTORS: dict[str, dict[str, Callable[[dict], str]]] = {
    "pods": {
        "metadata.name": lambda o: o["metadata"].get("name", ""),
        "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
        "spec.nodeName": lambda o: o.get("spec", {}).get("nodeName", "") or "",
        "spec.schedulerName": lambda o: o.get("spec", {}).get("schedulerName", "") or "",
        "spec.serviceAccountName": lambda o: o.get("spec", {}).get("serviceAccountName", "")
        or "",
        "spec.restartPolicy": lambda o: o.get("spec", {}).get("restartPolicy", "") or "",
        "status.phase": lambda o: o.get("status", {}).get("phase", "") or "",
        "status.podIP": lambda o: o.get("status", {}).get("podIP", "") or "",
        "status.nominatedNodeName": lambda o: o.get("status", {}).get("nominatedNodeName", "")
        or "",
    },
    "nodes": {
        "metadata.name": lambda o: o["metadata"].get("name", ""),
        "spec.unschedulable": lambda o: str(bool(o.get("spec", {}).get("unschedulable"))).lower(),
    },
    "secrets": {
        "metadata.name": lambda o: o["metadata"].get("name", ""),
        "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
        "type": lambda o: o.get("type", "") or "",
    },
}

# --- coordination.k8s.io/v1 Leases (the extender's leader election) -------------------------
# Self-contained: its resources, apiVersion, field selectors, routes and discovery are added to
# the core tables here and below, in blocks of their own.
# resource -> (kind, namespaced, apiVersion)
COORDINATION_RESOURCES: dict[str, tuple[str, bool, str]] = {
    "leases": ("Lease", True, "coordination.k8s.io/v1"),
}
RESOURCES.update({r: (k, ns) for r, (k, ns, _) in COORDINATION_RESOURCES.items()})
API_VERSIONS: dict[str, str] = {r: v for r, (_, _, v) in COORDINATION_RESOURCES.items()}
FIELD_SELECTORS["leases"] = {
    "metadata.name": lambda o: o["metadata"].get("name", ""),
    "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
}
# Lease times are MicroTime: the real server parses them with Go's RFC3339Micro layout, which
# needs exactly 6 fractional digits (a client sending "…T00:00:00+00:00" gets a 400).
_MICRO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")


def _check_lease(obj: dict) -> None:
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        raise _bad_request("spec must be an object")
    for f in ("acquireTime", "renewTime"):
        v = spec.get(f)
        if v is not None and (not isinstance(v, str) or not _MICRO_TIME.match(v)):
            raise _bad_request(
                f'Lease in version "v1" cannot be handled as a Lease: parsing time {v!r} as '
                f'"2006-01-02T15:04:05.000000Z07:00": spec.{f}'
            )
    d = spec.get("leaseDurationSeconds")
    if d is not None and (not isinstance(d, int) or d <= 0):
        raise _invalid("Lease", obj.get("metadata", {}).get("name", ""),
                       "spec.leaseDurationSeconds: Invalid value: must be greater than 0")


# --- end of the coordination.k8s.io block -------------------------------------------------

# Kubernetes strategic-merge keys for the lists copack objects carry.
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "ports": "containerPort",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "conditions": "type",
    "imagePullSecrets": "name",
    "addresses": "type",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
}

POD_SPEC_MUTABLE = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    """A failure answered as a v1 Status object."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _not_found(resource: str, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{resource} "{name}" not found', {"name": name, "kind": resource}
    )


def _conflict(resource: str, name: str, message: str) -> ApiError:
    return ApiError(
        409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": {message}',
        {"name": name, "kind": resource},
    )


def _invalid(kind: str, name: str, message: str) -> ApiError:
    return ApiError(
        422, "Invalid", f'{kind} "{name}" is invalid: {message}', {"name": name, "kind": kind}
    )


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# ---------------------------------------------------------------- selectors


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op in ("=", "in"):
            return self.key in labels and labels[self.key] in self.values
        # "!=" and "notin" match objects without the label, as in Kubernetes
        return labels.get(self.key) not in self.values


_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


def _split_top_level(selector: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(selector: str) -> list[_Requirement]:
    """Parse a Kubernetes label selector string; raise ApiError(400) naming the bad part."""
    reqs: list[_Requirement] = []
    for part in _split_top_level(selector):
        m = re.match(r"^(\S+)\s+(in|notin)\s+\((.*)\)$", part)
        if m:
            key, op, vals = m.group(1), m.group(2), m.group(3)
            values = tuple(v.strip() for v in vals.split(",") if v.strip())
            reqs.append(_Requirement(key, op, values))
        elif "!=" in part:
            key, _, val = part.partition("!=")
            reqs.append(_Requirement(key.strip(), "!=", (val.strip(),)))
        elif "==" in part:
            key, _, val = part.partition("==")
            reqs.append(_Requirement(key.strip(), "=", (val.strip(),)))
        elif "=" in part:
            key, _, val = part.partition("=")
            reqs.append(_Requirement(key.strip(), "=", (val.strip(),)))
        elif part.startswith("!"):
            reqs.append(_Requirement(part[1:].strip(), "!exists"))
        else:
            reqs.append(_Requirement(part, "exists"))
    for r in reqs:
        if not _LABEL_KEY.match(r.key):
            raise _bad_request(f"unable to parse requirement: invalid label key {r.key!r}")
    return reqs


@dataclass(frozen=True)
class _FieldRequirement:
    field: str
    negate: bool
    value: str


def parse_field_selector(resource: str, selector: str) -> list[_FieldRequirement]:
    reqs = []
    known = FIELD_SELECTORS[resource]
    for part in _split_top_level(selector):
        if "!=" in part:
            f, _, v = part.partition("!=")
            negate = True
        elif "==" in part:
            f, _, v = part.partition("==")
            negate = False
        elif "=" in part:
            f, _, v = part.partition("=")
            negate = False
        else:
            raise _bad_request(f"invalid selector: '{selector}'; can't understand '{part}'")
        f = f.strip()
        if f not in known:
            raise _bad_request(f"field label not supported: {f}")
        reqs.append(_FieldRequirement(f, negate, v.strip()))
    return reqs


@dataclass(frozen=True)
class _Filter:
    resource: str
    namespace: str | None
    labels: tuple[_Requirement, ...]
    fields: tuple[_FieldRequirement, ...]

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        getters = FIELD_SELECTORS[self.resource]
        for fr in self.fields:
            equal = getters[fr.field](obj) == fr.value
            if equal == fr.negate:
                return False
        return True


# ---------------------------------------------------------------- patches


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = _merge_patch(result.get(k), v)
    return result


def _strategic_merge(target: Any, patch: Any, key: str | None = None) -> Any:
    """Strategic merge patch: like merge patch, but lists with a known merge key are merged
    element-wise (`$patch: delete` inside an element removes it)."""
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        result = dict(target) if isinstance(target, dict) else {}
        for k, v in patch.items():
            if k.startswith("$"):
                continue
            if v is None:
                result.pop(k, None)
            else:
                result[k] = _strategic_merge(result.get(k), v, k)
        return result
    if isinstance(patch, list) and key in MERGE_KEYS and isinstance(target, list):
        mk = MERGE_KEYS[key]
        result = [copy.deepcopy(x) for x in target]
        for item in patch:
            if not isinstance(item, dict) or mk not in item:
                raise _bad_request(f"strategic merge patch: element of {key} lacks {mk!r}")
            idx = next(
                (i for i, x in enumerate(result) if isinstance(x, dict) and x.get(mk) == item[mk]),
                None,
            )
            if item.get("$patch") == "delete":
                if idx is not None:
                    result.pop(idx)
            elif idx is None:
                result.append({k: v for k, v in item.items() if not k.startswith("$")})
            else:
                result[idx] = _strategic_merge(result[idx], item)
        return result
    return copy.deepcopy(patch)


def _pointer_tokens(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _bad_request(f"json patch: path {path!r} does not start with '/'")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902 JSON patch."""
    doc = copy.deepcopy(doc)

    def parent_of(path: str) -> tuple[Any, str]:
        tokens = _pointer_tokens(path)
        if not tokens:
            raise _bad_request("json patch: cannot operate on the document root")
        cur = doc
        for t in tokens[:-1]:
            try:
                cur = cur[int(t)] if isinstance(cur, list) else cur[t]
            except (KeyError, IndexError, ValueError, TypeError):
                raise ApiError(
                    422, "Invalid", f"json patch: path {path!r}: missing parent at {t!r}"
                ) from None
        return cur, tokens[-1]

    def get(path: str) -> Any:
        cur = doc
        for t in _pointer_tokens(path):
            try:
                cur = cur[int(t)] if isinstance(cur, list) else cur[t]
            except (KeyError, IndexError, ValueError, TypeError):
                raise ApiError(422, "Invalid", f"json patch: path {path!r} not found") from None
        return cur

    def remove(path: str) -> Any:
        parent, last = parent_of(path)
        try:
            return parent.pop(int(last)) if isinstance(parent, list) else parent.pop(last)
        except (KeyError, IndexError, ValueError):
            raise ApiError(
                422, "Invalid", f"json patch: unable to remove nonexistent key {path!r}"
            ) from None

    def add(path: str, value: Any) -> None:
        parent, last = parent_of(path)
        if isinstance(parent, list):
            if last == "-":
                parent.append(value)
            else:
                try:
                    parent.insert(int(last), value)
                except ValueError:
                    raise ApiError(422, "Invalid", f"json patch: bad index in {path!r}") from None
        elif isinstance(parent, dict):
            parent[last] = value
        else:
            raise ApiError(422, "Invalid", f"json patch: parent of {path!r} is not a container")

    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise _bad_request("json patch: each operation needs 'op' and 'path'")
        kind, path = op["op"], op["path"]
        if kind == "add":
            add(path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            remove(path)
        elif kind == "replace":
            remove(path)
            add(path, copy.deepcopy(op.get("value")))
        elif kind == "test":
            if get(path) != op.get("value"):
                raise ApiError(422, "Invalid", f"json patch: test failed at {path!r}")
        elif kind == "move":
            add(path, remove(op["from"]))
        elif kind == "copy":
            add(path, copy.deepcopy(get(op["from"])))
        else:
            raise _bad_request(f"json patch: unknown operation {kind!r}")
    return doc


# ---------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """One request as the server saw it, with the RBAC verb it needs."""

    method: str
    path: str
    query: dict[str, str]
    verb: str
    resource: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    content_type: str | None
    body: Any
    user_agent: str | None
    authorization: str | None
    status: int = 0


@dataclass
class _Fault:
    verb: str
    count: int
    status: int | None
    resource: str | None
    subresource: str | None
    reason: str | None
    message: str | None
    delay_s: float
    drop: bool
    drop_after: bool = False

    def matches(self, verb: str, resource: str | None, subresource: str | None) -> bool:
        if self.verb == "bind":
            if not (verb == "create" and resource == "pods" and subresource == "binding"):
                return False
        elif self.verb != "*" and self.verb != verb:
            return False
        if self.resource is not None and self.resource != resource:
            return False
        return self.subresource is None or self.subresource == subresource


@dataclass
class _Event:
    rv: int
    resource: str
    type: str
    obj: dict
    old: dict | None
    encoded: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Watch:
    resource: str
    conn: socket.socket
    bookmarks: bool
    kicked: bool = False


class _DropConnection(Exception):
    """Close the client connection without an answer (fault injection, watch drop)."""


# ---------------------------------------------------------------- server


class FakeKubeApiServer:
    """See the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        history_limit: int = 10_000,
        bookmark_interval_s: float | None = None,
        watch_timeout_s: float = 1800.0,
        token: str | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self.history_limit = history_limit
        self.bookmark_interval_s = bookmark_interval_s
        self.watch_timeout_s = watch_timeout_s
        self.token = token
        self._cond = threading.Condition(threading.RLock())
        self._rv = 1
        self._objects: dict[str, dict[tuple[str, str], dict]] = {r: {} for r in RESOURCES}
        self._history: list[_Event] = []
        self._history_rvs: list[int] = []
        self._compacted_rv = 1  # watches from rv < this are answered 410
        self._drop_epoch = 0
        self._kick_epoch = 0
        self._bookmark_epoch = 0
        self._stopping = False
        self._faults: list[_Fault] = []
        self._watches: list[_Watch] = []
        self._conns: set[socket.socket] = set()
        self.requests: list[RecordedRequest] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeKubeApiServer:
        server = self

        class Handler(_Handler):
            fake = server

        httpd = _Server((self._host, self._port), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
            name="fake-kube-apiserver",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        with self._cond:
            conns = list(self._conns)
        for c in conns:
            _abort(c)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeKubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    def write_kubeconfig(self, path: str | Path, token: str | None = None) -> Path:
        """A kubeconfig pointing at this server (bearer token = `token`, else the server's)."""
        path = Path(path)
        tok = token or self.token or "fake-token"
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": tok}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    # ------------------------------------------------------------ knobs

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def drop_watches(self) -> None:
        with self._cond:
            self._drop_epoch += 1
            self._cond.notify_all()

    def expire_history(self, kick_watchers: bool = False) -> None:
        with self._cond:
            self._history.clear()
            self._history_rvs.clear()
            self._compacted_rv = self._rv
            if kick_watchers:
                self._kick_epoch += 1
            self._cond.notify_all()

    def send_bookmark(self) -> None:
        with self._cond:
            self._bookmark_epoch += 1
            self._cond.notify_all()

    def fail_next(
        self,
        verb: str,
        count: int = 1,
        status: int | None = 500,
        *,
        resource: str | None = None,
        subresource: str | None = None,
        reason: str | None = None,
        message: str | None = None,
        delay_s: float = 0.0,
        drop: bool = False,
        drop_after: bool = False,
    ) -> None:
        with self._cond:
            self._faults.append(
                _Fault(verb, count, status, resource, subresource, reason, message, delay_s, drop,
                       drop_after)
            )

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()

    def clear_requests(self) -> None:
        with self._cond:
            self.requests.clear()

    def requests_matching(
        self,
        verb: str | None = None,
        resource: str | None = None,
        subresource: str | None = None,
    ) -> list[RecordedRequest]:
        with self._cond:
            return [
                r
                for r in self.requests
                if (verb is None or r.verb == verb)
                and (resource is None or r.resource == resource)
                and (subresource is None or r.subresource == subresource)
            ]

    def open_watches(self, resource: str | None = None) -> int:
        with self._cond:
            return sum(1 for w in self._watches if resource is None or w.resource == resource)

    def wait_for_watches(self, n: int, resource: str | None = None, timeout: float = 10.0) -> None:
        """Block until at least `n` watches are open (e.g. after a drop, until re-watched)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.open_watches(resource) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self.open_watches(resource)} watches open on {resource or 'any'}, "
                        f"wanted {n}"
                    )
                self._cond.wait(left)

    # ------------------------------------------------------------ store (direct)

    def create(self, resource: str, obj: dict, namespace: str | None = None) -> dict:
        with self._cond:
            return copy.deepcopy(self._create(resource, namespace, copy.deepcopy(obj)))

    def add_node(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        allocatable: dict[str, str] | None = None,
    ) -> dict:
        alloc = {"cpu": "64", "memory": "512Gi", "pods": "110", **(allocatable or {})}
        node = {
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/hostname": name, **(labels or {})},
                "annotations": dict(annotations or {}),
            },
            "spec": {},
            "status": {"capacity": dict(alloc), "allocatable": dict(alloc)},
        }
        return self.create("nodes", node)

    def add_pod(self, pod: dict) -> dict:
        ns = pod.get("metadata", {}).get("namespace") or "default"
        return self.create("pods", pod, ns)

    def get(self, resource: str, name: str, namespace: str | None = None) -> dict | None:
        with self._cond:
            obj = self._objects[resource].get((namespace or "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, resource: str, namespace: str | None = None) -> list[dict]:
        with self._cond:
            return [
                copy.deepcopy(o)
                for (ns, _), o in sorted(self._objects[resource].items())
                if namespace is None or ns == namespace
            ]

    def patch(
        self,
        resource: str,
        name: str,
        patch: Any,
        namespace: str | None = None,
        patch_type: str = "strategic",
        subresource: str | None = None,
    ) -> dict:
        ctype = {
            "strategic": "application/strategic-merge-patch+json",
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
        }[patch_type]
        with self._cond:
            return copy.deepcopy(
                self._patch(resource, namespace, name, subresource, ctype, copy.deepcopy(patch))
            )

    def delete(self, resource: str, name: str, namespace: str | None = None) -> dict:
        with self._cond:
            return copy.deepcopy(self._delete(resource, namespace, name, None))

    def bind(
        self,
        namespace: str,
        name: str,
        node: str,
        uid: str | None = None,
        annotations: dict[str, str] | None = None,
    ) -> None:
        meta: dict[str, Any] = {"name": name}
        if uid:
            meta["uid"] = uid
        if annotations:
            meta["annotations"] = dict(annotations)
        with self._cond:
            self._bind(
                namespace, name, {"metadata": meta, "target": {"kind": "Node", "name": node}}
            )

    def set_pod_phase(self, namespace: str, name: str, phase: str) -> dict:
        return self.patch(
            "pods", name, {"status": {"phase": phase}}, namespace, "merge", subresource="status"
        )

    def begin_termination(self, namespace: str, name: str, grace_s: int) -> dict:
        """What a graceful DELETE does to a pod before its kubelet confirms: the object stays,
        with deletionTimestamp = now + grace (when the kubelet kills it), as a MODIFIED event."""
        with self._cond:
            key = self._key("pods", namespace, name)
            old = self._objects["pods"].get(key)
            if old is None:
                raise ApiError(404, "NotFound", f'pods "{name}" not found',
                               {"name": name, "kind": "pods"})
            new = copy.deepcopy(old)
            stamp = time.time() + grace_s
            new["metadata"]["deletionTimestamp"] = time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
            new["metadata"]["deletionGracePeriodSeconds"] = grace_s
            new["metadata"]["resourceVersion"] = str(self._next_rv())
            self._objects["pods"][key] = new
            self._record("pods", "MODIFIED", new, old)
            return copy.deepcopy(new)

    # ------------------------------------------------------------ store internals (lock held)

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _record(self, resource: str, etype: str, obj: dict, old: dict | None) -> None:
        ev = _Event(int(obj["metadata"]["resourceVersion"]), resource, etype, obj, old)
        self._history.append(ev)
        self._history_rvs.append(ev.rv)
        if len(self._history) > self.history_limit:
            drop = len(self._history) - self.history_limit
            self._compacted_rv = self._history[drop - 1].rv
            del self._history[:drop]
            del self._history_rvs[:drop]
        self._cond.notify_all()

    def _key(self, resource: str, namespace: str | None, name: str) -> tuple[str, str]:
        namespaced = RESOURCES[resource][1]
        return ((namespace or "") if namespaced else "", name)

    def _lookup(self, resource: str, namespace: str | None, name: str) -> dict:
        obj = self._objects[resource].get(self._key(resource, namespace, name))
        if obj is None:
            raise _not_found(resource, name)
        return obj

    def _create(self, resource: str, namespace: str | None, obj: dict) -> dict:
        kind, namespaced = RESOURCES[resource]
        if not isinstance(obj, dict):
            raise _bad_request(f"the body of a {kind} must be a JSON object")
        if obj.get("kind") not in (None, kind):
            raise _bad_request(f"the kind of the body is {obj.get('kind')!r}, expected {kind!r}")
        obj.pop("kind", None)
        obj.pop("apiVersion", None)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuidlib.uuid4().hex[:5]
            else:
                raise _invalid(kind, "", "metadata.name: Required value: name or generateName is "
                               "required")
        if namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        key = self._key(resource, namespace, meta["name"])
        if key in self._objects[resource]:
            raise ApiError(
                409, "AlreadyExists", f'{resource} "{meta["name"]}" already exists',
                {"name": meta["name"], "kind": resource},
            )
        meta["uid"] = str(uuidlib.uuid4())
        meta["creationTimestamp"] = _now_rfc3339()
        meta.pop("deletionTimestamp", None)
        meta["resourceVersion"] = str(self._next_rv())
        if resource == "pods":
            _default_pod(obj)
        elif resource in COORDINATION_RESOURCES:
            _check_lease(obj)
            obj.setdefault("spec", {})
        else:
            obj.setdefault("spec", {})
            obj.setdefault("status", {})
        self._objects[resource][key] = obj
        self._record(resource, "ADDED", obj, None)
        return obj

    def _write(self, resource: str, old: dict, new: dict) -> dict:
        """Store `new` in place of `old` (bumping rv, recording MODIFIED) unless unchanged."""
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old
        new["metadata"]["resourceVersion"] = str(self._next_rv())
        key = self._key(resource, old["metadata"].get("namespace"), old["metadata"]["name"])
        self._objects[resource][key] = new
        self._record(resource, "MODIFIED", new, old)
        return new

    def _check_update(
        self, resource: str, old: dict, new: dict, body_meta: dict, subresource: str | None
    ) -> dict:
        kind = RESOURCES[resource][0]
        name = old["metadata"]["name"]
        if not isinstance(new, dict) or not isinstance(new.get("metadata"), dict):
            raise _invalid(kind, name, "metadata: Required value")
        rv = body_meta.get("resourceVersion")
        if rv not in (None, "") and str(rv) != old["metadata"]["resourceVersion"]:
            raise _conflict(
                resource, name,
                "the object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        uid = body_meta.get("uid")
        if uid not in (None, "") and uid != old["metadata"]["uid"]:
            raise _conflict(
                resource, name,
                f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                f"{old['metadata']['uid']}",
            )
        new.pop("kind", None)
        new.pop("apiVersion", None)
        for f in ("name", "namespace", "uid", "creationTimestamp"):
            if new["metadata"].get(f) != old["metadata"].get(f):
                if f in ("name", "namespace"):
                    raise _invalid(kind, name, f"metadata.{f}: Invalid value: field is immutable")
                if old["metadata"].get(f) is None:
                    new["metadata"].pop(f, None)
                else:
                    new["metadata"][f] = old["metadata"][f]
        if subresource == "status":
            result = copy.deepcopy(old)
            result["status"] = new.get("status", {})
            return result
        if resource in COORDINATION_RESOURCES:  # no status
            _check_lease(new)
            return new
        new["status"] = copy.deepcopy(old.get("status", {}))
        if resource == "pods":
            old_spec, new_spec = old.get("spec", {}), new.get("spec", {})
            if _pod_spec_without_mutable(old_spec) != _pod_spec_without_mutable(new_spec):
                changed = sorted(
                    k for k in set(old_spec) | set(new_spec)
                    if k != "containers" and old_spec.get(k) != new_spec.get(k)
                ) or ["containers"]
                raise _invalid(
                    kind, name,
                    f"spec: Forbidden: pod updates may not change fields other than "
                    f"`spec.containers[*].image`,`spec.initContainers[*].image`,"
                    f"`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing "
                    f"tolerations),`spec.terminationGracePeriodSeconds` (changed: "
                    f"{', '.join('spec.' + c for c in changed)})",
                )
        return new

    def _patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        subresource: str | None,
        content_type: str,
        patch: Any,
    ) -> dict:
        old = self._lookup(resource, namespace, name)
        ctype = content_type.split(";")[0].strip().lower()
        if ctype == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _bad_request("json patch body must be a JSON array of operations")
            new = _json_patch(old, patch)
            body_meta: dict = {}
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(patch, dict):
                raise _bad_request(f"{ctype} body must be a JSON object")
            body_meta = patch.get("metadata") if isinstance(patch.get("metadata"), dict) else {}
            if ctype == "application/merge-patch+json":
                new = _merge_patch(old, patch)
            else:
                new = _strategic_merge(old, patch)
        else:
            raise ApiError(
                415, "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: application/json-patch+json, application/merge-patch+json, "
                f"application/strategic-merge-patch+json (got {content_type!r})",
            )
        new = self._check_update(resource, old, copy.deepcopy(new), body_meta, subresource)
        return self._write(resource, old, new)

    def _replace(
        self, resource: str, namespace: str | None, name: str, subresource: str | None, body: Any
    ) -> dict:
        old = self._lookup(resource, namespace, name)
        if not isinstance(body, dict):
            raise _bad_request("the body must be a JSON object")
        meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        if not meta.get("resourceVersion"):
            raise _invalid(
                RESOURCES[resource][0], name,
                "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
            )
        if meta.get("name") not in (None, name):
            raise _bad_request("the name of the object does not match the name on the URL")
        new = self._check_update(resource, old, copy.deepcopy(body), meta, subresource)
        return self._write(resource, old, new)

    def _delete(
        self, resource: str, namespace: str | None, name: str, options: Any
    ) -> dict:
        old = self._lookup(resource, namespace, name)
        if isinstance(options, dict):
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
                raise _conflict(
                    resource, name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: "
                    f"{old['metadata']['uid']}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"][
                "resourceVersion"
            ]:
                raise _conflict(resource, name, "the object has been modified")
        key = self._key(resource, namespace, name)
        del self._objects[resource][key]
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        gone["metadata"]["deletionTimestamp"] = _now_rfc3339()
        gone["metadata"]["deletionGracePeriodSeconds"] = 0
        self._record(resource, "DELETED", gone, old)
        return gone

    def _bind(self, namespace: str, name: str, binding: Any) -> dict:
        if not isinstance(binding, dict):
            raise _bad_request("the body of a Binding must be a JSON object")
        if binding.get("kind") not in (None, "Binding"):
            raise _bad_request(f"the kind of the body is {binding.get('kind')!r}, expected Binding")
        meta = binding.get("metadata") or {}
        target = binding.get("target") or {}
        if meta.get("name") not in (None, name):
            raise _bad_request(
                f"the name of the binding ({meta.get('name')}) does not match the pod ({name})"
            )
        if not isinstance(target, dict) or not target.get("name"):
            raise _invalid("Binding", name, "target.name: Required value")
        if target.get("kind") not in (None, "", "Node"):
            raise _invalid("Binding", name, "target.kind: Invalid value: must be empty or 'Node'")
        pod = self._lookup("pods", namespace, name)
        uid = meta.get("uid")
        if uid and uid != pod["metadata"]["uid"]:
            raise _conflict(
                "pods", name,
                f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                f"{pod['metadata']['uid']}",
            )
        rv = meta.get("resourceVersion")
        if rv and str(rv) != pod["metadata"]["resourceVersion"]:
            raise _conflict("pods", name, "the object has been modified")
        if pod.get("spec", {}).get("nodeName"):
            raise _conflict(
                "pods", name, f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"'
            )
        if pod["metadata"].get("deletionTimestamp"):
            raise _conflict("pods", name, f"pod {name} is being deleted, cannot be assigned")
        annotations = meta.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise _bad_request("metadata.annotations must map strings to strings")
        new = copy.deepcopy(pod)
        new["spec"]["nodeName"] = target["name"]
        if annotations:
            new["metadata"].setdefault("annotations", {}).update(annotations)
        conds = [
            c for c in new.setdefault("status", {}).get("conditions", [])
            if c.get("type") != "PodScheduled"
        ]
        conds.append(
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None,
             "lastTransitionTime": _now_rfc3339()}
        )
        new["status"]["conditions"] = conds
        self._write("pods", pod, new)
        return {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "code": 201,
        }

    def _list(
        self, flt: _Filter, limit: int | None, cont: str | None
    ) -> dict[str, Any]:
        kind = RESOURCES[flt.resource][0]
        list_rv = self._rv
        start: tuple[str, str] | None = None
        if cont:
            try:
                tok = orjson.loads(base64.urlsafe_b64decode(cont.encode()))
                list_rv = int(tok["rv"])
                start = (tok["start"][0], tok["start"][1])
            except Exception:
                raise _bad_request("continue key is not valid") from None
            if list_rv < self._compacted_rv:
                raise ApiError(
                    410, "Expired",
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter.",
                )
        items: list[dict] = []
        more: tuple[str, str] | None = None
        remaining = 0
        for key in sorted(self._objects[flt.resource]):
            if start is not None and key <= start:
                continue
            obj = self._objects[flt.resource][key]
            if not flt.matches(obj):
                continue
            if limit and len(items) >= limit:
                remaining += 1
                continue
            items.append(obj)
            more = key
        meta: dict[str, Any] = {"resourceVersion": str(list_rv)}
        if remaining and more is not None:
            meta["continue"] = base64.urlsafe_b64encode(
                orjson.dumps({"rv": list_rv, "start": list(more)})
            ).decode()
            meta["remainingItemCount"] = remaining
        return {"kind": f"{kind}List", "apiVersion": API_VERSIONS.get(flt.resource, "v1"),
                "metadata": meta, "items": items}

    # ------------------------------------------------------------ watch

    def _encode_event(self, ev: _Event, etype: str) -> bytes:
        line = ev.encoded.get(etype)
        if line is None:
            kind = RESOURCES[ev.resource][0]
            line = orjson.dumps(
                {"type": etype, "object": {
                    "kind": kind, "apiVersion": API_VERSIONS.get(ev.resource, "v1"), **ev.obj}}
            ) + b"\n"
            ev.encoded[etype] = line
        return line

    def _event_for(self, ev: _Event, flt: _Filter) -> str | None:
        if ev.resource != flt.resource:
            return None
        if ev.type == "ADDED":
            return "ADDED" if flt.matches(ev.obj) else None
        if ev.type == "DELETED":
            return "DELETED" if flt.matches(ev.old) else None
        was, now = flt.matches(ev.old), flt.matches(ev.obj)
        if was and now:
            return "MODIFIED"
        if now:
            return "ADDED"
        if was:
            return "DELETED"
        return None

    def _status_line(self, err: ApiError) -> bytes:
        return orjson.dumps({"type": "ERROR", "object": err.status()}) + b"\n"

    def _bookmark_line(self, resource: str, rv: int) -> bytes:
        kind = RESOURCES[resource][0]
        return orjson.dumps(
            {"type": "BOOKMARK",
             "object": {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}}}
        ) + b"\n"

    def _serve_watch(
        self,
        handler: _Handler,
        flt: _Filter,
        rv_param: str | None,
        bookmarks: bool,
        timeout_s: float,
    ) -> None:
        conn = handler.connection
        handler.close_connection = True  # a watch connection is never reused
        watch = _Watch(flt.resource, conn, bookmarks)
        deadline = time.monotonic() + timeout_s
        initial: list[bytes] = []
        gone: ApiError | None = None
        with self._cond:
            if rv_param in (None, "", "0"):
                pos = self._rv
                kind = RESOURCES[flt.resource][0]
                for key in sorted(self._objects[flt.resource]):
                    obj = self._objects[flt.resource][key]
                    if flt.matches(obj):
                        initial.append(
                            orjson.dumps(
                                {"type": "ADDED",
                                 "object": {"kind": kind, "apiVersion": "v1", **obj}}
                            ) + b"\n"
                        )
            else:
                try:
                    pos = int(rv_param)
                except ValueError:
                    raise _bad_request(f"invalid resourceVersion {rv_param!r}") from None
                if pos < self._compacted_rv:
                    gone = ApiError(
                        410, "Expired",
                        f"too old resource version: {pos} ({self._compacted_rv})",
                    )
            drop_epoch, kick_epoch = self._drop_epoch, self._kick_epoch
            bookmark_epoch = self._bookmark_epoch
            self._watches.append(watch)
            self._cond.notify_all()
        try:
            handler.start_chunked(200, "application/json")
            if gone is not None:
                handler.write_chunk(self._status_line(gone))
                handler.end_chunked()
                return
            for line in initial:
                handler.write_chunk(line)
            last_bookmark = time.monotonic()
            while True:
                lines: list[bytes] = []
                with self._cond:
                    while True:
                        if self._stopping or self._drop_epoch != drop_epoch:
                            raise _DropConnection
                        if self._kick_epoch != kick_epoch or pos < self._compacted_rv:
                            gone = ApiError(
                                410, "Expired",
                                f"too old resource version: {pos} ({self._compacted_rv})",
                            )
                            break
                        if self._history_rvs and self._history_rvs[-1] > pos:
                            break
                        if bookmarks and self._bookmark_epoch != bookmark_epoch:
                            break
                        now = time.monotonic()
                        if now >= deadline:
                            break
                        if (
                            bookmarks
                            and self.bookmark_interval_s is not None
                            and now - last_bookmark >= self.bookmark_interval_s
                        ):
                            break
                        self._cond.wait(min(0.5, deadline - now))
                        if _peer_closed(conn):
                            return
                    if gone is None:
                        i = bisect.bisect_right(self._history_rvs, pos)
                        for ev in self._history[i:]:
                            etype = self._event_for(ev, flt)
                            if etype is not None:
                                lines.append(self._encode_event(ev, etype))
                        if self._history_rvs:
                            pos = max(pos, self._history_rvs[-1])
                        now = time.monotonic()
                        want_bookmark = bookmarks and (
                            self._bookmark_epoch != bookmark_epoch
                            or (
                                self.bookmark_interval_s is not None
                                and now - last_bookmark >= self.bookmark_interval_s
                            )
                        )
                        bookmark_epoch = self._bookmark_epoch
                        if want_bookmark:
                            lines.append(self._bookmark_line(flt.resource, self._rv))
                            pos = max(pos, self._rv)
                            last_bookmark = now
                for line in lines:
                    handler.write_chunk(line)
                if gone is not None:
                    handler.write_chunk(self._status_line(gone))
                    handler.end_chunked()
                    return
                if time.monotonic() >= deadline:
                    handler.end_chunked()
                    return
        finally:
            with self._cond:
                if watch in self._watches:
                    self._watches.remove(watch)
                self._cond.notify_all()

    # ------------------------------------------------------------ request dispatch

    def _take_fault(self, verb: str, resource: str | None, sub: str | None) -> _Fault | None:
        with self._cond:
            for f in self._faults:
                if f.count > 0 and f.matches(verb, resource, sub):
                    f.count -= 1
                    if f.count == 0:
                        self._faults.remove(f)
                    return f
        return None


_ROUTES = [
    (re.compile(r"^/api/v1/(nodes|pods|secrets)$"), "collection"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/(pods|secrets)$"), "ns_collection"),
    (re.compile(r"^/api/v1/(nodes)/([^/]+)(?:/(status))?$"), "node"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/(pods)/([^/]+)(?:/(status|binding))?$"), "pod"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/(secrets)/([^/]+)()$"), "pod"),
]

# coordination.k8s.io/v1 (Leases): the same handlers as namespaced core resources
_ROUTES += [
    (re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/(leases)$"),
     "ns_collection"),
    (re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/(leases)/([^/]+)()$"),
     "pod"),
    (re.compile(r"^/apis/coordination\.k8s\.io/v1/(leases)$"), "collection"),
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The stdlib's listen backlog of 5 resets connections when 20+ clients connect at once.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients resetting idle keep-alive connections is normal: no traceback for that."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return
        super().handle_error(request, client_address)


def _abort(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        conn.close()


def _peer_closed(conn: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _default_pod(pod: dict) -> None:
    """Fill in what the API server's defaulting adds, so tests see pods as the API serves them."""
    spec = pod.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("priority", 0)
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault(
        "tolerations",
        [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
             "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
             "effect": "NoExecute", "tolerationSeconds": 300},
        ],
    )
    for c in spec.get("containers", []) or []:
        if isinstance(c, dict):
            c.setdefault("resources", {})
            lim = c["resources"].get("limits")
            if lim and "requests" not in c["resources"]:
                c["resources"]["requests"] = dict(lim)
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault("imagePullPolicy", "IfNotPresent")
    status = pod.setdefault("status", {})
    status.setdefault("phase", "Pending")
    status.setdefault("qosClass", "BestEffort")


def _pod_spec_without_mutable(spec: dict) -> dict:
    s = {k: v for k, v in spec.items() if k not in POD_SPEC_MUTABLE}
    for key in ("containers", "initContainers"):
        if isinstance(s.get(key), list):
            s[key] = [
                {k: v for k, v in c.items() if k != "image"} if isinstance(c, dict) else c
                for c in s[key]
            ]
    return s


def _truthy(v: str | None) -> bool:
    return v is not None and v.lower() in ("true", "1")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKubeApiServer
    protocol_version = "HTTP/1.1"
    server_version = "fake-kube-apiserver/1.31"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.fake._cond:
            self.fake._conns.add(self.connection)

    def finish(self) -> None:
        with self.fake._cond:
            self.fake._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- writing

    _discard = False
    _rec: RecordedRequest | None = None

    @property
    def _status(self) -> int:
        return self._rec.status if self._rec is not None else 0

    @_status.setter
    def _status(self, code: int) -> None:
        # recorded before the answer goes out: a client that got it sees it in `requests`
        if self._rec is not None:
            self._rec.status = code

    def _send_json(self, code: int, body: Any) -> None:
        if self._discard:
            self._status = code
            return
        data = orjson.dumps(body)
        self._status = code  # recorded before the client can see the answer
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self, code: int, ctype: str) -> None:
        self._status = code  # recorded before the client can see the answer
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    # -- verbs

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        fake = self.fake
        self._rec = None
        self._discard = False
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        rec = RecordedRequest(
            method=method, path=path, query=query, verb="", resource=None, subresource=None,
            namespace=None, name=None, content_type=self.headers.get("Content-Type"), body=None,
            user_agent=self.headers.get("User-Agent"),
            authorization=self.headers.get("Authorization"),
        )
        self._rec = rec
        with fake._cond:
            fake.requests.append(rec)
        try:
            body_raw = self._read_body()
            route = self._route(method, path, query, rec)
            if body_raw:
                try:
                    rec.body = orjson.loads(body_raw)
                except orjson.JSONDecodeError as e:
                    raise _bad_request(f"the request body is not valid JSON: {e}") from None
            if fake.token is not None and rec.authorization != f"Bearer {fake.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            fault = fake._take_fault(rec.verb, rec.resource, rec.subresource)
            if fault is not None:
                if fault.delay_s:
                    time.sleep(fault.delay_s)
                if fault.drop:
                    raise _DropConnection
                if fault.drop_after and route is not None:
                    self._discard = True  # do the work, lose the answer
                    route()
                    raise _DropConnection
                if fault.status is not None and not fault.drop_after:
                    raise ApiError(
                        fault.status,
                        fault.reason or _REASONS.get(fault.status, "InternalError"),
                        fault.message or f"injected failure of {rec.verb} {rec.resource}",
                    )
            if route is None:
                return
            route()
        except ApiError as e:
            try:
                self._send_json(e.code, e.status())
            except OSError:
                self.close_connection = True
        except _DropConnection:
            self.close_connection = True
            _abort(self.connection)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        except Exception as e:  # a bug in the fake: answer 500 rather than hang the client
            self._send_json(500, ApiError(500, "InternalError", f"fake apiserver bug: {e!r}")
                            .status())
        finally:
            self._rec = None

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        if not length:
            return b""
        n = int(length)
        if n > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, "RequestEntityTooLarge", "request entity too large")
        return self.rfile.read(n)

    def _route(
        self, method: str, path: str, query: dict[str, str], rec: RecordedRequest
    ) -> Callable[[], None] | None:
        fake = self.fake
        if path in ("/healthz", "/readyz", "/livez"):
            rec.verb = "get"
            return lambda: self._send_text(200, b"ok")
        if path == "/version":
            rec.verb = "get"
            return lambda: self._send_json(
                200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-copack-fake",
                      "platform": "linux/amd64"},
            )
        if path == "/api":
            rec.verb = "get"
            return lambda: self._send_json(
                200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{fake.port}"}]},
            )
        if path == "/api/v1":
            rec.verb = "get"
            return lambda: self._send_json(200, _API_RESOURCE_LIST)
        policy = _policy_route(self, method, path, query, rec)  # policy/v1 (rebalancer)
        if policy is not None:
            return policy
        for rx, kind in _ROUTES:
            m = rx.match(path)
            if not m:
                continue
            ns: str | None
            name: str | None
            sub: str | None
            if kind == "collection":
                resource, ns, name, sub = m.group(1), None, None, None
            elif kind == "ns_collection":
                ns, resource, name, sub = unquote(m.group(1)), m.group(2), None, None
            elif kind == "node":
                resource, name, sub = m.group(1), unquote(m.group(2)), m.group(3)
                ns = None
            else:
                ns, resource, name, sub = (
                    unquote(m.group(1)), m.group(2), unquote(m.group(3)), m.group(4) or None
                )
            rec.resource, rec.namespace, rec.name, rec.subresource = resource, ns, name, sub
            return self._handler_for(method, resource, ns, name, sub, query, rec)
        rec.verb = method.lower()
        raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                                        f"({method} {path})")

    def _handler_for(
        self,
        method: str,
        resource: str,
        ns: str | None,
        name: str | None,
        sub: str | None,
        query: dict[str, str],
        rec: RecordedRequest,
    ) -> Callable[[], None]:
        fake = self.fake
        kind_name = resource
        if name is None:
            if method == "GET":
                watching = _truthy(query.get("watch"))
                rec.verb = "watch" if watching else "list"

                def collection() -> None:
                    flt = _Filter(
                        resource,
                        ns,
                        tuple(parse_label_selector(query.get("labelSelector", ""))),
                        tuple(parse_field_selector(resource, query.get("fieldSelector", ""))),
                    )
                    if watching:
                        try:
                            timeout = float(query.get("timeoutSeconds") or fake.watch_timeout_s)
                        except ValueError:
                            raise _bad_request("timeoutSeconds must be a number") from None
                        fake._serve_watch(
                            self, flt, query.get("resourceVersion"),
                            _truthy(query.get("allowWatchBookmarks")), timeout,
                        )
                        return
                    try:
                        limit = int(query["limit"]) if query.get("limit") else None
                    except ValueError:
                        raise _bad_request("limit must be an integer") from None
                    with fake._cond:
                        body = fake._list(flt, limit, query.get("continue") or None)
                        data = orjson.dumps(body)
                    self._send_raw_json(200, data)

                return collection
            if method == "POST" and (ns is not None or resource == "nodes"):
                rec.verb = "create"

                def create() -> None:
                    with fake._cond:
                        obj = fake._create(resource, ns, copy.deepcopy(rec.body))
                        out = _with_kind(resource, obj)
                    self._send_json(201, out)

                return create
            rec.verb = method.lower()
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {resource}")

        if sub == "binding":
            rec.verb = "create" if method == "POST" else method.lower()
            if method != "POST":
                raise ApiError(405, "MethodNotAllowed", "only POST is supported on pods/binding")

            def binding() -> None:
                with fake._cond:
                    status = fake._bind(ns or "", name, rec.body)
                self._send_json(201, status)

            return binding

        verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
        if verb is None or (verb == "delete" and sub is not None):
            rec.verb = method.lower()
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
        rec.verb = verb

        def item() -> None:
            with fake._cond:
                if verb == "get":
                    obj = fake._lookup(resource, ns, name)
                    code = 200
                elif verb == "patch":
                    obj = fake._patch(
                        resource, ns, name, sub, rec.content_type or "", copy.deepcopy(rec.body)
                    )
                    code = 200
                elif verb == "update":
                    obj = fake._replace(resource, ns, name, sub, rec.body)
                    code = 200
                else:
                    obj = fake._delete(resource, ns, name, rec.body)
                    code = 200
                out = _with_kind(kind_name, obj)
            self._send_json(code, out)

        return item

    def _send_raw_json(self, code: int, data: bytes) -> None:
        if self._discard:
            self._status = code
            return
        self._status = code  # recorded before the client can see the answer
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, code: int, data: bytes) -> None:
        self._status = code  # recorded before the client can see the answer
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _with_kind(resource: str, obj: dict) -> dict:
    return {"kind": RESOURCES[resource][0], "apiVersion": API_VERSIONS.get(resource, "v1"),
            **obj}


_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
    410: "Expired", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
    503: "ServiceUnavailable", 504: "Timeout",
}

_API_RESOURCE_LIST = {
    "kind": "APIResourceList",
    "groupVersion": "v1",
    "resources": [
        {"name": "nodes", "singularName": "node", "namespaced": False, "kind": "Node",
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
        {"name": "nodes/status", "singularName": "", "namespaced": False, "kind": "Node",
         "verbs": ["get", "patch", "update"]},
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
        {"name": "pods/binding", "singularName": "", "namespaced": True, "kind": "Binding",
         "verbs": ["create"]},
        {"name": "pods/status", "singularName": "", "namespaced": True, "kind": "Pod",
         "verbs": ["get", "patch", "update"]},
        {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
    ],
}


def iter_watch_lines(data: bytes) -> Iterator[dict]:
    """Parse a watch body (JSON lines) — for tests that read raw watch streams."""
    for line in data.splitlines():
        if line.strip():
            yield orjson.loads(line)


# ---------------------------------------------------------------- policy/v1 (rebalancer)
# Self-contained: PodDisruptionBudgets under /apis/policy/v1 and the pods/eviction subresource,
# which copack-rebalancer moves pods through. `_route` asks `_policy_route` first.
#   GET  /apis, /apis/policy, /apis/policy/v1                               discovery
#   GET  /apis/policy/v1/poddisruptionbudgets                               list (all namespaces)
#   GET|POST /apis/policy/v1/namespaces/NS/poddisruptionbudgets             list, create
#   GET|PATCH|PUT|DELETE /apis/policy/v1/namespaces/NS/poddisruptionbudgets/N (and /status)
#   POST /api/v1/namespaces/NS/pods/P/eviction                              evict
# Eviction as kube-apiserver does it: a Pending or finished pod is deleted at once; otherwise
# the one PDB whose selector matches the pod's labels must allow a disruption
# (`status.disruptionsAllowed` > 0; the fake runs no disruption controller, so tests set it),
# which the eviction then spends (disruptionsAllowed - 1, the pod in `status.disruptedPods`)
# before deleting the pod; 0 answers 429 TooManyRequests with a DisruptionBudget cause, more than
# one matching PDB 500. Success is 201 with a v1 Status.

POLICY_RESOURCES: dict[str, tuple[str, bool]] = {
    "poddisruptionbudgets": ("PodDisruptionBudget", True),
}
RESOURCES.update(POLICY_RESOURCES)
FIELD_SELECTORS["poddisruptionbudgets"] = {
    "metadata.name": lambda o: o["metadata"].get("name", ""),
    "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
}
# resource -> apiVersion, for resources outside the core group
API_VERSIONS: dict[str, str] = {"poddisruptionbudgets": "policy/v1"}

# API group discovery (/apis): group name -> (preferred version, its APIResourceList)
API_GROUPS: dict[str, tuple[str, dict[str, Any]]] = {
    "policy": ("v1", {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "policy/v1",
        "resources": [
            {"name": "poddisruptionbudgets", "singularName": "poddisruptionbudget",
             "namespaced": True, "kind": "PodDisruptionBudget", "shortNames": ["pdb"],
             "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
            {"name": "poddisruptionbudgets/status", "singularName": "", "namespaced": True,
             "kind": "PodDisruptionBudget", "verbs": ["get", "patch", "update"]},
        ],
    }),
}
_API_RESOURCE_LIST["resources"].append(
    {"name": "pods/eviction", "singularName": "", "namespaced": True, "group": "policy",
     "version": "v1", "kind": "Eviction", "verbs": ["create"]}
)

_POLICY_ROUTES = [
    (re.compile(r"^/apis/policy/v1/(poddisruptionbudgets)$"), "collection"),
    (re.compile(r"^/apis/policy/v1/namespaces/([^/]+)/(poddisruptionbudgets)$"), "ns_collection"),
    (re.compile(r"^/apis/policy/v1/namespaces/([^/]+)/(poddisruptionbudgets)/([^/]+)"
                r"(?:/(status))?$"), "item"),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/(pods)/([^/]+)/(eviction)$"), "eviction"),
]


def _api_group_list() -> dict[str, Any]:
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
             "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
            for g, (v, _) in sorted(API_GROUPS.items())
        ],
    }


def _policy_route(
    handler: _Handler, method: str, path: str, query: dict[str, str], rec: RecordedRequest
) -> Callable[[], None] | None:
    """The handler for a policy/v1 or discovery path, or None when the path is not one."""
    if path == "/apis":
        rec.verb = "get"
        return lambda: handler._send_json(200, _api_group_list())
    for group, (version, resources) in API_GROUPS.items():
        if path == f"/apis/{group}":
            rec.verb = "get"
            gv = {"groupVersion": f"{group}/{version}", "version": version}
            return lambda gv=gv, group=group: handler._send_json(200, {
                "kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv],
                "preferredVersion": gv})
        if path == f"/apis/{group}/{version}":
            rec.verb = "get"
            return lambda resources=resources: handler._send_json(200, resources)
    for rx, kind in _POLICY_ROUTES:
        m = rx.match(path)
        if not m:
            continue
        if kind == "collection":
            resource, ns, name, sub = m.group(1), None, None, None
        elif kind == "ns_collection":
            ns, resource, name, sub = unquote(m.group(1)), m.group(2), None, None
        else:
            ns, resource, name, sub = (
                unquote(m.group(1)), m.group(2), unquote(m.group(3)), m.group(4) or None
            )
        rec.resource, rec.namespace, rec.name, rec.subresource = resource, ns, name, sub
        if kind != "eviction":
            return handler._handler_for(method, resource, ns, name, sub, query, rec)
        rec.verb = "create" if method == "POST" else method.lower()
        if method != "POST":
            raise ApiError(405, "MethodNotAllowed", "only POST is supported on pods/eviction")
        return _eviction_handler(handler, ns or "", name or "", rec)
    return None


def _eviction_handler(
    handler: _Handler, ns: str, name: str, rec: RecordedRequest
) -> Callable[[], None]:
    fake = handler.fake

    def eviction() -> None:
        with fake._cond:
            status = _evict(fake, ns, name, rec.body)
        handler._send_json(201, status)

    return eviction


def _label_selector_matches(selector: Any, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels + matchExpressions); {} matches all, None nothing."""
    if not isinstance(selector, dict):
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _evict(fake: FakeKubeApiServer, namespace: str, name: str, body: Any) -> dict[str, Any]:
    """pods/eviction (lock held); see the block comment above."""
    if not isinstance(body, dict):
        raise _bad_request("the body of an Eviction must be a JSON object")
    if body.get("kind") not in (None, "Eviction"):
        raise _bad_request(f"the kind of the body is {body.get('kind')!r}, expected Eviction")
    meta = body.get("metadata") or {}
    if meta.get("name") not in (None, name):
        raise _bad_request(f"name in URL does not match name in Eviction object ({name})")
    pod = fake._lookup("pods", namespace, name)
    phase = (pod.get("status") or {}).get("phase")
    if phase not in ("Pending", "Succeeded", "Failed") and not pod["metadata"].get(
        "deletionTimestamp"
    ):
        labels = pod["metadata"].get("labels") or {}
        pdbs = [
            p for (ns, _), p in sorted(fake._objects["poddisruptionbudgets"].items())
            if ns == namespace and _label_selector_matches((p.get("spec") or {}).get("selector"),
                                                           labels)
        ]
        if len(pdbs) > 1:
            raise ApiError(500, "InternalError", "This pod has more than one "
                           "PodDisruptionBudget, which the eviction subresource does not support.")
        if pdbs:
            pdb = pdbs[0]
            st = pdb.get("status") or {}
            if int(st.get("disruptionsAllowed") or 0) <= 0:
                raise ApiError(
                    429, "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                    {"causes": [{
                        "reason": "DisruptionBudget",
                        "message": f"The disruption budget {pdb['metadata']['name']} needs "
                                   f"{st.get('desiredHealthy', 0)} healthy pods and has "
                                   f"{st.get('currentHealthy', 0)} currently",
                    }]},
                )
            new = copy.deepcopy(pdb)
            new_st = new.setdefault("status", {})
            new_st["disruptionsAllowed"] = int(st["disruptionsAllowed"]) - 1
            new_st.setdefault("disruptedPods", {})[name] = _now_rfc3339()
            fake._write("poddisruptionbudgets", pdb, new)
    fake._delete("pods", namespace, name, body.get("deleteOptions"))
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "code": 201}
