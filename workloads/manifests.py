"""`copack workload render`: Kubernetes manifests for a P/D deployment scheduled by copack.

Prefill and decode Deployments run `copack workload serve` (one line per role) with
`schedulerName: copack-scheduler` and one `copack.io/gpu` share, the copack annotations (role,
model, and load/SLO/demand when given) on the pod template, and the downward-API environment
the launcher reads: the pod IP for the NIXL side channel, the SM share and demand copack
assigned. The proxy Deployment finds the backends by label selector (its ServiceAccount may
list pods in the namespace) and a Service exposes it. Everything validates against the
Kubernetes OpenAPI schema in strict mode (`kubernetes-validate`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from policies.inventory import (
    DEMAND_ANNOTATION,
    GPU_RESOURCE,
    LOAD_ANNOTATION,
    MODEL_ANNOTATION,
    ROLE_ANNOTATION,
    SCHEDULER_NAME,
    SLO_ANNOTATION,
    SM_SHARE_ANNOTATION,
    UNIT_ANNOTATION,
)
from workloads.idle_wait import DEFAULT_IDLE_S
from workloads.launcher import (
    DEFAULT_SIDE_CHANNEL_PORT,
    ENV_DEMAND,
    ENV_POD_IP,
    ENV_SM_SHARE,
    ENV_UNIT,
)
from workloads.roles import DECODE, MIXED, PREFILL

DEFAULT_VLLM_IMAGE = "ghcr.io/copack/vllm:0.1.0"
DEFAULT_PROXY_IMAGE = "ghcr.io/copack/proxy:0.1.0"
VLLM_PORT = 8000
PROXY_PORT = 8000
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class RenderError(ValueError):
    """Options that cannot give valid manifests; names the option."""


@dataclass
class RenderSpec:
    model: str
    prefill: int = 1
    decode: int = 1
    name: str | None = None
    namespace: str = "default"
    image: str = DEFAULT_VLLM_IMAGE
    proxy_image: str = DEFAULT_PROXY_IMAGE
    connector: str = "nixl"
    load: str | None = None
    slo: str | None = None
    prefill_demand: str | None = None
    decode_demand: str | None = None
    max_model_len: int | None = None
    cpu: str = "4"
    memory: str = "32Gi"
    proxy_replicas: int = 1


def slug(model: str) -> str:
    """A DNS-1123 name from a model id: `meta-llama/Llama-3.1-8B` -> `llama-3-1-8b`."""
    tail = model.rstrip("/").rsplit("/", 1)[-1].lower()
    s = re.sub(r"[^a-z0-9]+", "-", tail).strip("-")
    return s[:40].strip("-") or "model"


def _validate(spec: RenderSpec) -> str:
    from policies.annotations import AnnotationError, parse_demand, parse_load, parse_slo

    if not spec.model.strip():
        raise RenderError("--model is empty")
    if spec.prefill < 0 or spec.decode < 1:
        raise RenderError("need --decode >= 1 and --prefill >= 0")
    if spec.proxy_replicas < 1:
        raise RenderError("--proxy-replicas must be at least 1")
    if spec.connector not in ("nixl", "example"):
        raise RenderError(f"--connector {spec.connector!r} is not nixl or example")
    name = spec.name or slug(spec.model)
    if not _NAME.match(name) or len(name) > 40:
        raise RenderError(
            f"--name {name!r} must be lowercase letters, digits and '-' (at most 40 characters)"
        )
    checks = (
        (spec.load, parse_load, "--load"),
        (spec.slo, parse_slo, "--slo"),
        (spec.prefill_demand, parse_demand, "--prefill-demand"),
        (spec.decode_demand, parse_demand, "--decode-demand"),
    )
    for value, parse, option in checks:
        if value is not None:
            try:
                parse(value)  # type: ignore[operator]
            except AnnotationError as e:
                raise RenderError(f"{option}: {e}") from None
    return name


def _labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "copack-workload",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "copack",
    }


def _selector(name: str, component: str) -> str:
    labels = _labels(name, component)
    keys = ("app.kubernetes.io/instance", "app.kubernetes.io/component")
    return ",".join(f"{k}={labels[k]}" for k in keys)


def _env_field(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


# A prefill pod being deleted hands over until its replacement has loaded its model (the
# startup probe allows minutes): its grace bounds that. Decode and mixed pods only finish what
# they hold.
HANDOVER_GRACE_S = 600
DRAIN_GRACE_S = 60


def _server(spec: RenderSpec, name: str, role: str, replicas: int) -> dict[str, Any]:
    labels = _labels(name, role)
    annotations = {ROLE_ANNOTATION: role, MODEL_ANNOTATION: spec.model}
    if spec.load:
        annotations[LOAD_ANNOTATION] = spec.load
    if spec.slo:
        annotations[SLO_ANNOTATION] = spec.slo
    demand = spec.prefill_demand if role == PREFILL else spec.decode_demand
    if demand:
        annotations[DEMAND_ANNOTATION] = demand
    command = [
        "copack", "workload", "serve",
        "--role", role,
        "--model", spec.model,
        "--port", str(VLLM_PORT),
    ]  # fmt: skip
    if role != MIXED:  # a mixed server (no prefill pods) needs no KV connector
        command += ["--connector", spec.connector]
    if spec.max_model_len:
        command += ["--max-model-len", str(spec.max_model_len)]
    env = [
        _env_field(ENV_POD_IP, "status.podIP"),
        _env_field("VLLM_NIXL_SIDE_CHANNEL_HOST", "status.podIP"),
        {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(DEFAULT_SIDE_CHANNEL_PORT)},
        _env_field(ENV_SM_SHARE, f"metadata.annotations['{SM_SHARE_ANNOTATION}']"),
        _env_field(ENV_DEMAND, f"metadata.annotations['{DEMAND_ANNOTATION}']"),
        _env_field(ENV_UNIT, f"metadata.annotations['{UNIT_ANNOTATION}']"),
    ]
    probe_http = {"path": "/health", "port": "http"}
    container = {
        "name": "vllm",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "ports": [
            {"name": "http", "containerPort": VLLM_PORT, "protocol": "TCP"},
            {"name": "nixl", "containerPort": DEFAULT_SIDE_CHANNEL_PORT, "protocol": "TCP"},
        ],
        "env": env,
        "resources": {
            "requests": {"cpu": spec.cpu, "memory": spec.memory},
            "limits": {GPU_RESOURCE: "1", "memory": spec.memory},
        },
        # Loading weights takes minutes: the startup probe allows 20, then liveness takes over.
        "startupProbe": {
            "httpGet": probe_http,
            "periodSeconds": 10,
            "failureThreshold": 120,
            "timeoutSeconds": 5,
        },
        "readinessProbe": {
            "httpGet": probe_http,
            "periodSeconds": 5,
            "failureThreshold": 3,
            "timeoutSeconds": 5,
        },
        "livenessProbe": {
            "httpGet": probe_http,
            "periodSeconds": 15,
            "failureThreshold": 4,
            "timeoutSeconds": 10,
        },
        "volumeMounts": [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "hf-cache", "mountPath": "/root/.cache/huggingface"},
        ],
        # Deleted, the server goes on serving until it has been idle (workloads/idle_wait.py):
        # in-flight requests finish, and a prefill pod the proxy hands over serves until its
        # replacement is Ready (workloads/discovery.py).
        "lifecycle": {"preStop": {"exec": {"command": [
            "copack", "workload", "wait-idle", "--port", str(VLLM_PORT),
            "--idle", f"{DEFAULT_IDLE_S:g}",
        ]}}},
    }  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{name}-{role}", "namespace": spec.namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {
                    "schedulerName": SCHEDULER_NAME,
                    "terminationGracePeriodSeconds": (
                        HANDOVER_GRACE_S if role == PREFILL else DRAIN_GRACE_S
                    ),
                    "containers": [container],
                    "volumes": [
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
                        {"name": "hf-cache", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def _proxy(spec: RenderSpec, name: str) -> list[dict[str, Any]]:
    labels = _labels(name, "proxy")
    sa = f"{name}-proxy"
    meta = {"namespace": spec.namespace, "labels": labels}
    command = [
        "copack", "workload", "proxy",
        "--port", str(PROXY_PORT),
        "--namespace", spec.namespace,
        "--decode-selector", _selector(name, DECODE if spec.prefill else MIXED),
        "--backend-port", str(VLLM_PORT),
    ]  # fmt: skip
    if spec.prefill:
        command += ["--prefill-selector", _selector(name, PREFILL)]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": sa, **meta},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": sa, **meta},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": spec.namespace}],
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": sa, **meta},
            "spec": {
                "replicas": spec.proxy_replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": sa,
                        "containers": [
                            {
                                "name": "proxy",
                                "image": spec.proxy_image,
                                "imagePullPolicy": "IfNotPresent",
                                "command": command,
                                "ports": [
                                    {"name": "http", "containerPort": PROXY_PORT, "protocol": "TCP"}
                                ],
                                "resources": {
                                    "requests": {"cpu": "500m", "memory": "256Mi"},
                                    "limits": {"memory": "1Gi"},
                                },
                                # Ready only while it has backends to send to (/health is 503
                                # otherwise); alive as long as it accepts connections.
                                "readinessProbe": {
                                    "httpGet": {"path": "/health", "port": "http"},
                                    "periodSeconds": 5,
                                },
                                "livenessProbe": {
                                    "tcpSocket": {"port": "http"},
                                    "periodSeconds": 15,
                                },
                            }
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, **meta},
            "spec": {
                "type": "ClusterIP",
                "selector": labels,
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
            },
        },
    ]


def render(spec: RenderSpec) -> list[dict[str, Any]]:
    """All objects for the deployment, in apply order."""
    name = _validate(spec)
    objects: list[dict[str, Any]] = []
    if spec.prefill:
        objects.append(_server(spec, name, PREFILL, spec.prefill))
    # Without prefill pods the servers do both halves themselves: role mixed.
    objects.append(_server(spec, name, DECODE if spec.prefill else MIXED, spec.decode))
    objects += _proxy(spec, name)
    return objects


def to_yaml(objects: list[dict[str, Any]]) -> str:
    import yaml

    class _NoAliases(yaml.SafeDumper):
        """Shared label dicts would otherwise come out as &id001 anchors."""

        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump_all(objects, Dumper=_NoAliases, sort_keys=False, default_flow_style=False)
