"""kube-scheduler extender v1 wire types, parsed and built by hand.

The Go types (k8s.io/kube-scheduler/extender/v1) have no json tags, so keys are the Go field
names: `Pod`, `Nodes`, `NodeNames`, `FailedNodes`, `FailedAndUnresolvableNodes`, `Error`,
`Host`, `Score`, `PodName`, `PodNamespace`, `PodUID`, `Node`. Parsing is hand-written (orjson +
type checks) rather than pydantic because it sits on the per-pod hot path and because every
rejection must name the exact field for the 400 answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from extender.name_lists import NameListCache, split_names

MAX_EXTENDER_PRIORITY = 10  # k8s.io/kube-scheduler/extender/v1.MaxExtenderPriority


class BadRequest(ValueError):
    """The request cannot be understood; answered HTTP 400 with the message."""


@dataclass(slots=True)
class ExtenderArgs:
    pod: dict[str, Any]
    namespace: str
    name: str
    uid: str
    node_names: list[str]
    # nodeCacheCapable=false: the full v1 Node objects, in input order (else None)
    nodes: list[dict[str, Any]] | None

    @property
    def cache_capable(self) -> bool:
        return self.nodes is None


@dataclass(slots=True, frozen=True)
class BindingArgs:
    pod_name: str
    pod_namespace: str
    pod_uid: str
    node: str


def _loads(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("empty request body (expected a JSON object)")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def _pod_identity(pod: Any) -> tuple[str, str, str]:
    if pod is None:
        raise BadRequest("missing Pod")
    if not isinstance(pod, dict):
        raise BadRequest(f"Pod must be an object, got {type(pod).__name__}")
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        raise BadRequest("Pod.metadata must be an object")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("Pod.metadata.name must be a non-empty string")
    ns = meta.get("namespace", "default")
    if ns is None:
        ns = "default"
    if not isinstance(ns, str) or not ns:
        raise BadRequest("Pod.metadata.namespace must be a non-empty string")
    uid = meta.get("uid", "")
    if uid is None:
        uid = ""
    if not isinstance(uid, str):
        raise BadRequest("Pod.metadata.uid must be a string")
    for key in ("annotations", "labels"):
        v = meta.get(key)
        if v is not None and not (
            isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
        ):
            raise BadRequest(f"Pod.metadata.{key} must map strings to strings")
    spec = pod.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise BadRequest("Pod.spec must be an object")
    return ns, name, uid


def parse_extender_args(body: bytes, names: NameListCache | None = None) -> ExtenderArgs:
    """ExtenderArgs from the request body; with `names`, a NodeNames array seen recently is
    taken from it instead of decoded (extender/name_lists.py)."""
    cut = split_names(body) if names is not None else None
    if cut is not None:
        rest, raw = cut
        try:
            head = orjson.loads(rest)
        except orjson.JSONDecodeError:
            head = None  # the ordinary parse below says what is wrong
        if isinstance(head, dict) and "NodeNames" in head and head["NodeNames"] is None:
            known = names.get(raw)
            if known is not None:
                ns, name, uid = _pod_identity(head.get("Pod"))
                return ExtenderArgs(head["Pod"], ns, name, uid, known, None)
            try:  # the cut is the top-level array: decode it alone, the rest is parsed
                head["NodeNames"] = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return _parse_data(_loads(body))  # says where in the body it went wrong
            args = _parse_data(head)
            names.put(raw, args.node_names)
            return args
    return _parse_data(_loads(body))


def _parse_data(data: dict[str, Any]) -> ExtenderArgs:
    ns, name, uid = _pod_identity(data.get("Pod"))
    raw_names = data.get("NodeNames")
    raw_nodes = data.get("Nodes")
    if raw_names is not None:
        if not isinstance(raw_names, list):
            raise BadRequest(
                f"NodeNames must be an array of strings, got {type(raw_names).__name__}"
            )
        # C-level checks first (5,000 names per call; join refuses anything but str, at a
        # fifth of the cost of collecting the types); find the culprit only on failure
        try:
            "".join(raw_names)
            bad = "" in raw_names
        except TypeError:
            bad = True
        if bad:
            for i, n in enumerate(raw_names):
                if not isinstance(n, str) or not n:
                    raise BadRequest(f"NodeNames[{i}] must be a non-empty string")
        return ExtenderArgs(data["Pod"], ns, name, uid, raw_names, None)
    if raw_nodes is not None:
        if not isinstance(raw_nodes, dict):
            raise BadRequest(f"Nodes must be a v1 NodeList object, got {type(raw_nodes).__name__}")
        items = raw_nodes.get("items")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise BadRequest("Nodes.items must be an array")
        names = []
        for i, node in enumerate(items):
            if not isinstance(node, dict) or not isinstance(node.get("metadata"), dict):
                raise BadRequest(f"Nodes.items[{i}] must be a v1 Node object with metadata")
            n = node["metadata"].get("name")
            if not isinstance(n, str) or not n:
                raise BadRequest(f"Nodes.items[{i}].metadata.name must be a non-empty string")
            names.append(n)
        return ExtenderArgs(data["Pod"], ns, name, uid, names, items)
    # Both null: the scheduler had no candidate (nothing to filter).
    return ExtenderArgs(data["Pod"], ns, name, uid, [], None)


def parse_binding_args(body: bytes) -> BindingArgs:
    data = _loads(body)
    out = {}
    for key in ("PodName", "PodNamespace", "PodUID", "Node"):
        v = data.get(key)
        if v is None:
            raise BadRequest(f"missing {key}")
        if not isinstance(v, str):
            raise BadRequest(f"{key} must be a string, got {type(v).__name__}")
        if not v and key != "PodUID":
            raise BadRequest(f"{key} must not be empty")
        out[key] = v
    return BindingArgs(out["PodName"], out["PodNamespace"], out["PodUID"], out["Node"])


def filter_result(
    args: ExtenderArgs,
    feasible: list[str],
    failed: dict[str, str],
    unresolvable: dict[str, str] | None = None,
    error: str = "",
    names_json: bytes | None = None,
) -> bytes:
    """ExtenderFilterResult in the mode the request came in (NodeNames or Nodes).
    `names_json`: `feasible` already encoded (the caller keeps those bytes), spliced in."""
    if names_json is not None and args.nodes is None:
        return b"".join((
            b'{"Nodes":null,"NodeNames":', names_json,
            b',"FailedNodes":', orjson.dumps(failed),
            b',"FailedAndUnresolvableNodes":', orjson.dumps(unresolvable or {}),
            b',"Error":', orjson.dumps(error), b"}",
        ))
    result: dict[str, Any] = {
        "Nodes": None,
        "NodeNames": None,
        "FailedNodes": failed,
        "FailedAndUnresolvableNodes": unresolvable or {},
        "Error": error,
    }
    if args.nodes is None:
        result["NodeNames"] = feasible
    else:
        keep = set(feasible)
        result["Nodes"] = {
            "metadata": {},
            "items": [n for n in args.nodes if n["metadata"]["name"] in keep],
        }
    return orjson.dumps(result)


def priority_result(scores: list[tuple[str, int]]) -> bytes:
    """HostPriorityList: a bare JSON array."""
    return orjson.dumps([{"Host": h, "Score": s} for h, s in scores])


def binding_result(error: str = "") -> bytes:
    return orjson.dumps({"Error": error})


def error_body(message: str) -> bytes:
    return orjson.dumps({"Error": message})
