"""A field-by-field check of KubeSchedulerConfiguration (kubescheduler.config.k8s.io/v1)
against the v1 Go types: k8s.io/kube-scheduler/config/v1/types.go (json tags) and the
component-base v1alpha1 types it embeds (LeaderElectionConfiguration,
ClientConnectionConfiguration, DebuggingConfiguration). kube-scheduler decodes its config
strictly, so an unknown or mistyped field stops it at start; this finds that before a cluster
does, plus the extender rules kube-scheduler enforces at validation (weight > 0 with a
prioritizeVerb, at most one binder, parseable durations)."""

from __future__ import annotations

import re
from typing import Any

# Field specs: a type name, a nested spec (dict), or ("list", spec).
DURATION = "duration"  # metav1.Duration: a Go duration string

LEADER_ELECTION = {
    "leaderElect": "bool",
    "leaseDuration": DURATION,
    "renewDeadline": DURATION,
    "retryPeriod": DURATION,
    "resourceLock": "str",
    "resourceName": "str",
    "resourceNamespace": "str",
}
CLIENT_CONNECTION = {
    "kubeconfig": "str",
    "acceptContentTypes": "str",
    "contentType": "str",
    "qps": "float",
    "burst": "int",
}
PLUGIN = {"name": "str", "weight": "int"}
PLUGIN_SET = {"enabled": ("list", PLUGIN), "disabled": ("list", PLUGIN)}
EXTENSION_POINTS = (
    "preEnqueue", "queueSort", "preFilter", "filter", "postFilter", "preScore", "score",
    "reserve", "permit", "preBind", "bind", "postBind", "multiPoint", "placementGenerate",
    "placementScore", "placementFeasible", "podGroupPostFilter",
)  # fmt: skip
PLUGINS = dict.fromkeys(EXTENSION_POINTS, PLUGIN_SET)
PLUGIN_CONFIG = {"name": "str", "args": "any"}
PROFILE = {
    "schedulerName": "str",
    "percentageOfNodesToScore": "int",
    "percentageOfPlacementsToScore": "int",
    "plugins": PLUGINS,
    "pluginConfig": ("list", PLUGIN_CONFIG),
}
EXTENDER_TLS = {
    "insecure": "bool",
    "serverName": "str",
    "certFile": "str",
    "keyFile": "str",
    "caFile": "str",
    "certData": "bytes",
    "keyData": "bytes",
    "caData": "bytes",
}
MANAGED_RESOURCE = {"name": "str", "ignoredByScheduler": "bool"}
EXTENDER = {
    "urlPrefix": "str",
    "filterVerb": "str",
    "preemptVerb": "str",
    "prioritizeVerb": "str",
    "weight": "int",
    "bindVerb": "str",
    "enableHTTPS": "bool",
    "tlsConfig": EXTENDER_TLS,
    "httpTimeout": DURATION,
    "nodeCacheCapable": "bool",
    "managedResources": ("list", MANAGED_RESOURCE),
    "ignorable": "bool",
}
KUBE_SCHEDULER_CONFIGURATION = {
    "apiVersion": "str",
    "kind": "str",
    "parallelism": "int",
    "leaderElection": LEADER_ELECTION,
    "clientConnection": CLIENT_CONNECTION,
    # DebuggingConfiguration, inlined
    "enableProfiling": "bool",
    "enableContentionProfiling": "bool",
    "percentageOfNodesToScore": "int",
    "percentageOfPlacementsToScore": "int",
    "podInitialBackoffSeconds": "int",
    "podMaxBackoffSeconds": "int",
    "profiles": ("list", PROFILE),
    "extenders": ("list", EXTENDER),
    "delayCacheUntilActive": "bool",
}
REQUIRED = {id(PLUGIN): ("name",), id(PLUGIN_CONFIG): ("name",), id(EXTENDER): ("urlPrefix",),
            id(MANAGED_RESOURCE): ("name",)}

_GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$|^0$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "any":
        return True
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == DURATION:
        return isinstance(value, str) and bool(_GO_DURATION.match(value))
    if kind == "bytes":  # []byte in JSON/YAML: base64
        return isinstance(value, str) and len(value) % 4 == 0 and bool(_BASE64.match(value))
    raise ValueError(f"unknown field type {kind}")


def _check(spec: Any, value: Any, path: str, errors: list[str]) -> None:
    if isinstance(spec, tuple):
        if not isinstance(value, list):
            errors.append(f"{path}: must be a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(spec[1], item, f"{path}[{i}]", errors)
        return
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            errors.append(f"{path}: must be a mapping, got {type(value).__name__}")
            return
        for k, v in value.items():
            if k not in spec:
                errors.append(f"{path}.{k}: unknown field (v1 has: {', '.join(sorted(spec))})")
            else:
                _check(spec[k], v, f"{path}.{k}", errors)
        for k in REQUIRED.get(id(spec), ()):
            if k not in value:
                errors.append(f"{path}.{k}: required")
        return
    if not _type_ok(spec, value):
        errors.append(f"{path}: {value!r} is not a valid {spec}")


def check(config: Any) -> list[str]:
    """Every problem with a KubeSchedulerConfiguration, each naming the field; [] when valid."""
    errors: list[str] = []
    if not isinstance(config, dict):
        return [f"<root>: must be a mapping, got {type(config).__name__}"]
    if config.get("apiVersion") != "kubescheduler.config.k8s.io/v1":
        got = config.get("apiVersion")
        errors.append(f"apiVersion: {got!r}, need kubescheduler.config.k8s.io/v1")
    if config.get("kind") != "KubeSchedulerConfiguration":
        errors.append(f"kind: {config.get('kind')!r}, need KubeSchedulerConfiguration")
    _check(KUBE_SCHEDULER_CONFIGURATION, config, "", errors)
    if errors:
        return [e.lstrip(".") for e in errors]
    names = [p.get("schedulerName", "default-scheduler") for p in config.get("profiles", [])]
    if len(names) != len(set(names)):
        errors.append(f"profiles: duplicate schedulerName in {names}")
    binders = 0
    for i, ext in enumerate(config.get("extenders", [])):
        where = f"extenders[{i}]"
        if ext.get("prioritizeVerb") and ext.get("weight", 0) <= 0:
            errors.append(f"{where}.weight: must be > 0 when prioritizeVerb is set")
        if ext.get("bindVerb"):
            binders += 1
        scheme = "https://" if ext.get("enableHTTPS") else "http://"
        if not ext["urlPrefix"].startswith(scheme):
            errors.append(f"{where}.urlPrefix: {ext['urlPrefix']!r} does not start with {scheme}")
        for j, mr in enumerate(ext.get("managedResources", [])):
            if "/" not in mr["name"]:
                errors.append(f"{where}.managedResources[{j}].name: not an extended resource")
    if binders > 1:
        errors.append(f"extenders: {binders} extenders set bindVerb; only one may bind")
    le = config.get("leaderElection", {})
    if le.get("leaderElect") and le.get("resourceLock", "leases") != "leases":
        errors.append("leaderElection.resourceLock: only `leases` is supported")
    return errors
