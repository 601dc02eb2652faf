"""Turn a Pod, as the API server serves it (camelCase JSON dict), into a PodRequest.

Parsing is strict: a malformed `copack.io/*` annotation raises AnnotationError naming the key,
the offending part and what was expected, so the extender can answer with a readable reason
instead of silently scheduling on made-up numbers."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from policies.inventory import (
    DEMAND_ANNOTATION,
    GPU_RESOURCE,
    LOAD_ANNOTATION,
    MODEL_ANNOTATION,
    ROLE_ANNOTATION,
    SLO_ANNOTATION,
)
from policies.model import ROLES, DemandOverride, LoadSpec, PodRequest, Slo


class AnnotationError(ValueError):
    """A `copack.io/*` annotation (or the GPU limit) that cannot be used; says which and why."""


_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([KMGTPE]i|[kMGTPE])?\s*$")
_SUFFIX = {
    None: 1,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "Ei": 1024**6,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(us|µs|ms|s|m)\s*$")
_DURATION_UNIT = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_quantity(text: str, *, key: str = "quantity") -> int:
    """A Kubernetes-style byte quantity ("24Gi", "500M", "1073741824") -> bytes."""
    m = _QUANTITY.match(text)
    if not m:
        raise AnnotationError(
            f"{key}: {text!r} is not a byte quantity (expected e.g. 24Gi, 512Mi, 40G or bytes)"
        )
    return int(float(m.group(1)) * _SUFFIX[m.group(2)])


def parse_duration(text: str, *, key: str = "duration") -> float:
    """ "500ms", "0.5s", "200us" -> seconds. A bare number is refused: ms vs s is a common slip."""
    m = _DURATION.match(text)
    if not m:
        raise AnnotationError(
            f"{key}: {text!r} is not a duration with a unit (expected e.g. 500ms, 0.5s, 50ms)"
        )
    value = float(m.group(1)) * _DURATION_UNIT[m.group(2)]
    if value <= 0:
        raise AnnotationError(f"{key}: {text!r} must be greater than zero")
    return value


def _pairs(annotation: str, text: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """Split "a=1,b=2" into a dict, refusing unknown, repeated or empty keys."""
    if not isinstance(text, str) or not text.strip():
        raise AnnotationError(f"{annotation}: empty value (expected {'=..,'.join(allowed)}=..)")
    out: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise AnnotationError(f"{annotation}: {part!r} is not key=value")
        k, v = (s.strip() for s in part.split("=", 1))
        k = k.lower()
        if k not in allowed:
            raise AnnotationError(
                f"{annotation}: unknown key {k!r} (allowed: {', '.join(allowed)})"
            )
        if k in out:
            raise AnnotationError(f"{annotation}: key {k!r} given twice")
        if not v:
            raise AnnotationError(f"{annotation}: key {k!r} has no value")
        out[k] = v
    if not out:
        raise AnnotationError(f"{annotation}: no key=value pairs in {text!r}")
    return out


def _float(annotation: str, key: str, v: str, lo: float, hi: float | None) -> float:
    try:
        x = float(v)
    except ValueError:
        raise AnnotationError(f"{annotation}: {key}={v!r} is not a number") from None
    if not math.isfinite(x) or x < lo or (hi is not None and x > hi):
        bound = f"between {lo:g} and {hi:g}" if hi is not None else f"at least {lo:g}"
        raise AnnotationError(f"{annotation}: {key}={v!r} must be {bound}")
    return x


def _int(annotation: str, key: str, v: str, lo: int) -> int:
    try:
        x = int(v)
    except ValueError:
        raise AnnotationError(f"{annotation}: {key}={v!r} is not a whole number") from None
    if x < lo:
        raise AnnotationError(f"{annotation}: {key}={v!r} must be at least {lo}")
    return x


def parse_role(text: str) -> str:
    role = text.strip().lower() if isinstance(text, str) else ""
    if role not in ROLES:
        raise AnnotationError(
            f"{ROLE_ANNOTATION}: {text!r} is not a role (expected one of {', '.join(ROLES)})"
        )
    return role


def parse_load(text: str) -> LoadSpec:
    """`rps=4,prompt=2048,output=128` (output optional)."""
    kv = _pairs(LOAD_ANNOTATION, text, ("rps", "prompt", "output"))
    for required in ("rps", "prompt"):
        if required not in kv:
            raise AnnotationError(f"{LOAD_ANNOTATION}: missing {required}= (in {text!r})")
    rps = _float(LOAD_ANNOTATION, "rps", kv["rps"], 0.0, None)
    prompt = _int(LOAD_ANNOTATION, "prompt", kv["prompt"], 1)
    output = _int(LOAD_ANNOTATION, "output", kv["output"], 1) if "output" in kv else None
    return LoadSpec(rps=rps, prompt_tokens=prompt, output_tokens=output)


def parse_demand(text: str) -> DemandOverride:
    """`sm=0.6,bw=0.2,mem=24Gi`: fractions of a full GPU of the unit's type, memory absolute."""
    kv = _pairs(DEMAND_ANNOTATION, text, ("sm", "bw", "mem"))
    sm = _float(DEMAND_ANNOTATION, "sm", kv["sm"], 0.0, 1.0) if "sm" in kv else None
    bw = _float(DEMAND_ANNOTATION, "bw", kv["bw"], 0.0, 1.0) if "bw" in kv else None
    mem = parse_quantity(kv["mem"], key=f"{DEMAND_ANNOTATION}: mem") if "mem" in kv else None
    return DemandOverride(sm=sm, bw=bw, mem_bytes=mem)


def parse_slo(text: str) -> Slo:
    """`ttft=500ms,tpot=50ms` (either may be left out)."""
    kv = _pairs(SLO_ANNOTATION, text, ("ttft", "tpot"))
    ttft = parse_duration(kv["ttft"], key=f"{SLO_ANNOTATION}: ttft") if "ttft" in kv else None
    tpot = parse_duration(kv["tpot"], key=f"{SLO_ANNOTATION}: tpot") if "tpot" in kv else None
    return Slo(ttft_s=ttft, tpot_s=tpot)


def _containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = pod.get("spec") or {}
    return [c for c in (spec.get("containers") or []) if isinstance(c, Mapping)]


def gpu_slots(pod: Mapping[str, Any]) -> int:
    """Sum of `copack.io/gpu` over the pod's containers (limits, else requests); 0 if none."""
    total = 0
    for c in _containers(pod):
        res = c.get("resources") or {}
        raw = (res.get("limits") or {}).get(GPU_RESOURCE)
        if raw is None:
            raw = (res.get("requests") or {}).get(GPU_RESOURCE)
        if raw is None:
            continue
        try:
            n = int(str(raw).strip())
        except ValueError:
            raise AnnotationError(
                f"resources {GPU_RESOURCE}: {raw!r} in container {c.get('name')!r} is not a "
                "whole number"
            ) from None
        if n < 0:
            raise AnnotationError(f"resources {GPU_RESOURCE}: {raw!r} must not be negative")
        total += n
    return total


def requests_gpu(pod: Mapping[str, Any]) -> bool:
    """Does the pod ask for a copack unit? (A malformed limit counts as asking, so it is
    reported by the filter rather than ignored.)"""
    try:
        return gpu_slots(pod) > 0
    except AnnotationError:
        return True


def _role_inferrer() -> Callable[[Mapping[str, Any]], str | None] | None:
    """workloads/roles.py knows vLLM, llm-d, Dynamo and AIBrix conventions; use it if present."""
    try:
        from workloads.roles import infer_role
    except ImportError:
        return None
    return infer_role


def pod_request_from_k8s(pod: Mapping[str, Any]) -> PodRequest:
    """Parse a Pod JSON dict. Raises AnnotationError for a malformed copack annotation."""
    if not isinstance(pod, Mapping):
        raise AnnotationError(f"pod must be a JSON object, got {type(pod).__name__}")
    meta = pod.get("metadata") or {}
    ann: Mapping[str, Any] = meta.get("annotations") or {}
    name = str(meta.get("name") or "")
    if not name:
        raise AnnotationError("pod has no metadata.name")
    namespace = str(meta.get("namespace") or "default")

    role_source = "default"
    role = "mixed"
    if ROLE_ANNOTATION in ann:
        role, role_source = parse_role(ann[ROLE_ANNOTATION]), "annotation"
    else:
        infer = _role_inferrer()
        inferred = infer(pod) if infer is not None else None
        if inferred is not None:
            if inferred not in ROLES:
                raise AnnotationError(f"role inferred from the pod is {inferred!r}, not a role")
            role, role_source = inferred, "inferred"

    model = ann.get(MODEL_ANNOTATION)
    if model is not None:
        model = str(model).strip()
        if not model:
            raise AnnotationError(f"{MODEL_ANNOTATION}: empty model id")

    load = parse_load(ann[LOAD_ANNOTATION]) if LOAD_ANNOTATION in ann else None
    demand = parse_demand(ann[DEMAND_ANNOTATION]) if DEMAND_ANNOTATION in ann else None
    slo = parse_slo(ann[SLO_ANNOTATION]) if SLO_ANNOTATION in ann else Slo()
    return PodRequest(
        namespace=namespace,
        name=name,
        uid=str(meta.get("uid") or ""),
        role=role,
        model=model,
        load=load,
        demand=demand,
        slo=slo,
        gpus=gpu_slots(pod),
        role_source=role_source,
        group=workload_group(meta, namespace),
    )


def workload_group(meta: Mapping[str, Any], namespace: str) -> str:
    """`namespace/Kind/name` of the pod's controller owner (its ReplicaSet, StatefulSet,
    LeaderWorkerSet...), else "". Only the controller says exactly which pods are replicas of
    one workload: app labels are often shared by unrelated deployments (`app: vllm`)."""
    refs = meta.get("ownerReferences")
    if isinstance(refs, list):
        for ref in refs:
            if isinstance(ref, Mapping) and ref.get("controller") and ref.get("name"):
                return f"{namespace}/{ref.get('kind', '')}/{ref['name']}"
    return ""
