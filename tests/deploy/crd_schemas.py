"""JSON schemas for the two custom resources the prometheus overlay uses, which
kubernetes-validate has no schema for: ServiceMonitor and PodMonitor (monitoring.coreos.com/v1).

Copied by hand from the openAPIV3Schema of prometheus-operator's CRDs
(example/prometheus-operator-crd/monitoring.coreos.com_{servicemonitors,podmonitors}.yaml,
operator.prometheus.io/version 0.87.0): same types, enums, patterns and required fields, for the
fields listed here only. Unlike the CRDs, every object here forbids unknown properties, which is
what the API server's strict field validation (kubectl's default) does with the CRD's structural
schema. So this is stricter than the real thing for fields left out: if a manifest needs one,
copy its definition from the CRD rather than loosening these."""

from __future__ import annotations

from typing import Any

DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties,
                           "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return out


_STRINGS = {"type": "array", "items": {"type": "string"}}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

LABEL_SELECTOR = _obj({
    "matchExpressions": {"type": "array", "items": _obj(
        {"key": {"type": "string"}, "operator": {"type": "string"}, "values": _STRINGS},
        ("key", "operator"))},
    "matchLabels": _STRING_MAP,
})
NAMESPACE_SELECTOR = _obj({"any": {"type": "boolean"}, "matchNames": _STRINGS})
SECRET_KEY_SELECTOR = _obj(
    {"key": {"type": "string"}, "name": {"type": "string"}, "optional": {"type": "boolean"}},
    ("key",),
)
CONFIGMAP_KEY_SELECTOR = SECRET_KEY_SELECTOR
SECRET_OR_CONFIGMAP = _obj({"configMap": CONFIGMAP_KEY_SELECTOR, "secret": SECRET_KEY_SELECTOR})
TLS_VERSION = {"type": "string", "enum": ["TLS10", "TLS11", "TLS12", "TLS13"]}
TLS_CONFIG = _obj({
    "ca": SECRET_OR_CONFIGMAP,
    "caFile": {"type": "string"},
    "cert": SECRET_OR_CONFIGMAP,
    "certFile": {"type": "string"},
    "insecureSkipVerify": {"type": "boolean"},
    "keyFile": {"type": "string"},
    "keySecret": SECRET_KEY_SELECTOR,
    "maxVersion": TLS_VERSION,
    "minVersion": TLS_VERSION,
    "serverName": {"type": "string"},
})
_ACTIONS = ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
            "lowercase", "uppercase", "keepequal", "dropequal"]
_ACTIONS_CAMEL = ["Replace", "Keep", "Drop", "HashMod", "LabelMap", "LabelDrop", "LabelKeep",
                  "Lowercase", "Uppercase", "KeepEqual", "DropEqual"]
RELABEL_CONFIG = _obj({
    "action": {"type": "string", "enum": [a for p in zip(_ACTIONS, _ACTIONS_CAMEL, strict=True)
                                          for a in p]},
    "modulus": {"type": "integer"},
    "regex": {"type": "string"},
    "replacement": {"type": "string"},
    "separator": {"type": "string"},
    "sourceLabels": _STRINGS,
    "targetLabel": {"type": "string"},
})
SCHEME = {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]}
_ENDPOINT_COMMON = {
    "path": {"type": "string"},
    "scheme": SCHEME,
    "params": {"type": "object", "additionalProperties": _STRINGS},
    "interval": DURATION,
    "scrapeTimeout": DURATION,
    "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"},
    "relabelings": {"type": "array", "items": RELABEL_CONFIG},
    "metricRelabelings": {"type": "array", "items": RELABEL_CONFIG},
    "tlsConfig": TLS_CONFIG,
}
METADATA = _obj({
    "name": {"type": "string", "minLength": 1},
    "namespace": {"type": "string", "minLength": 1},
    "labels": _STRING_MAP,
    "annotations": _STRING_MAP,
}, ("name",))


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _obj({
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": kind},
        "metadata": METADATA,
        "spec": spec,
    }, ("apiVersion", "kind", "metadata", "spec"))


SERVICE_MONITOR = _resource("ServiceMonitor", _obj({
    "endpoints": {"type": "array", "items": _obj({
        **_ENDPOINT_COMMON,
        "port": {"type": "string"},
        "targetPort": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    })},
    "jobLabel": {"type": "string"},
    "namespaceSelector": NAMESPACE_SELECTOR,
    "selector": LABEL_SELECTOR,
    "targetLabels": _STRINGS,
    "podTargetLabels": _STRINGS,
}, ("endpoints", "selector")))

POD_MONITOR = _resource("PodMonitor", _obj({
    "podMetricsEndpoints": {"type": "array", "items": _obj({
        **_ENDPOINT_COMMON,
        "port": {"type": "string"},
        "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
    })},
    "jobLabel": {"type": "string"},
    "namespaceSelector": NAMESPACE_SELECTOR,
    "selector": LABEL_SELECTOR,
    "podTargetLabels": _STRINGS,
}, ("selector",)))

SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
}
