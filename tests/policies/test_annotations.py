"""Parsing pods as the API server serves them; errors that say what was wrong."""

from __future__ import annotations

import json
from typing import Any

import pytest

from policies.annotations import (
    AnnotationError,
    gpu_slots,
    parse_duration,
    parse_quantity,
    pod_request_from_k8s,
    requests_gpu,
)
from policies.model import DemandOverride, LoadSpec, Slo


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    container = {
        "name": "vllm",
        "image": "vllm/vllm-openai",
        "resources": {"limits": {"copack.io/gpu": "1"}},
    }
    container.update(spec.pop("container", {}))
    return {
        "metadata": {
            "name": "p0",
            "namespace": "serving",
            "uid": "u-1",
            "annotations": annotations or {},
            "labels": spec.pop("labels", {}),
        },
        "spec": {"schedulerName": "copack-scheduler", "containers": [container], **spec},
    }


def test_full_annotation_set() -> None:
    r = pod_request_from_k8s(
        pod(
            {
                "copack.io/role": "Prefill",
                "copack.io/model": "meta-llama/Llama-3.1-8B-Instruct",
                "copack.io/load": "rps=4, prompt=2048, output=128",
                "copack.io/demand": "sm=0.6,bw=0.2,mem=24Gi",
                "copack.io/slo": "ttft=500ms,tpot=50ms",
            }
        )
    )
    assert (r.namespace, r.name, r.uid, r.key) == ("serving", "p0", "u-1", "serving/p0")
    assert r.role == "prefill" and r.role_source == "annotation"
    assert r.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert r.load == LoadSpec(4.0, 2048, 128)
    assert r.demand == DemandOverride(0.6, 0.2, 24 * 2**30)
    assert r.slo == Slo(0.5, 0.05)
    assert r.gpus == 1


def test_defaults_without_annotations() -> None:
    r = pod_request_from_k8s(pod())
    assert r.role == "mixed" and r.role_source == "default"
    assert r.model is None and r.load is None and r.demand is None and r.slo.empty


def test_role_inferred_from_vllm_kv_role() -> None:
    cfg = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_consumer"})
    args = ["--model", "m", "--kv-transfer-config", cfg]
    r = pod_request_from_k8s(pod(container={"args": args}))
    assert r.role == "decode" and r.role_source == "inferred"
    cfg_p = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_producer"})
    r = pod_request_from_k8s(pod(container={"args": ["--kv-transfer-config", cfg_p]}))
    assert r.role == "prefill"


def test_annotation_beats_inferred_role() -> None:
    cfg = json.dumps({"kv_role": "kv_consumer"})
    r = pod_request_from_k8s(
        pod({"copack.io/role": "prefill"}, container={"args": ["--kv-transfer-config", cfg]})
    )
    assert r.role == "prefill" and r.role_source == "annotation"


def test_role_from_llm_d_label() -> None:
    r = pod_request_from_k8s(pod(labels={"llm-d.ai/role": "decode"}))
    assert r.role == "decode" and r.role_source == "inferred"


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("copack.io/role", "prefil", "copack.io/role"),
        ("copack.io/load", "rps=four,prompt=10", "rps='four' is not a number"),
        ("copack.io/load", "prompt=10", "missing rps"),
        ("copack.io/load", "rps=1,prompt=0", "prompt='0' must be at least 1"),
        ("copack.io/load", "rps=1,prompt=10,qps=3", "unknown key 'qps'"),
        ("copack.io/load", "rps=1,prompt=10,rps=2", "given twice"),
        ("copack.io/load", "rps=-1,prompt=10", "must be at least 0"),
        ("copack.io/load", "rps=nan,prompt=10", "copack.io/load"),
        ("copack.io/load", "", "empty value"),
        ("copack.io/demand", "sm=1.5", "sm='1.5' must be between 0 and 1"),
        ("copack.io/demand", "mem=24 gigs", "not a byte quantity"),
        ("copack.io/demand", "sm", "is not key=value"),
        ("copack.io/slo", "ttft=500", "with a unit"),
        ("copack.io/slo", "ttft=0ms", "greater than zero"),
        ("copack.io/slo", "latency=5ms", "unknown key 'latency'"),
        ("copack.io/model", "  ", "empty model id"),
    ],
)
def test_bad_annotations_name_key_and_problem(key: str, value: str, needle: str) -> None:
    with pytest.raises(AnnotationError) as e:
        pod_request_from_k8s(pod({key: value}))
    msg = str(e.value)
    assert key.split("/")[1] in msg or key in msg
    assert needle in msg
    assert isinstance(e.value, ValueError)


def test_gpu_limit_parsing() -> None:
    assert gpu_slots(pod()) == 1
    two = pod(container={"resources": {"limits": {"copack.io/gpu": 2}}})
    assert gpu_slots(two) == 2 and pod_request_from_k8s(two).gpus == 2
    by_request = pod(container={"resources": {"requests": {"copack.io/gpu": "1"}}})
    assert gpu_slots(by_request) == 1
    none = pod(container={"resources": {}})
    assert gpu_slots(none) == 0 and not requests_gpu(none)
    bad = pod(container={"resources": {"limits": {"copack.io/gpu": "one"}}})
    with pytest.raises(AnnotationError, match=r"copack\.io/gpu: 'one'"):
        gpu_slots(bad)
    assert requests_gpu(bad)  # reported by the filter rather than silently ignored
    assert requests_gpu(pod())


def test_pod_shape_errors() -> None:
    with pytest.raises(AnnotationError, match="JSON object"):
        pod_request_from_k8s(["not", "a", "pod"])  # type: ignore[arg-type]
    with pytest.raises(AnnotationError, match=r"metadata\.name"):
        pod_request_from_k8s({"metadata": {}, "spec": {}})
    assert pod_request_from_k8s({"metadata": {"name": "x"}}).namespace == "default"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("24Gi", 24 * 2**30),
        ("512Mi", 512 * 2**20),
        ("40G", 40 * 10**9),
        ("1.5Gi", 3 * 2**29),
        ("123", 123),
    ],
)
def test_quantities(text: str, value: int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    ("text", "value"), [("500ms", 0.5), ("2s", 2.0), ("250us", 250e-6), ("1m", 60.0)]
)
def test_durations(text: str, value: float) -> None:
    assert parse_duration(text) == pytest.approx(value)
