"""Pod objects the simulated Deployments create, as the API server would serve them.

Each pod carries what a real copack user writes (role, model, expected load, SLO), the vLLM
command line of a disaggregated prefill or decode server (so role inference has something
real to read), and a limit of one `copack.io/gpu` slot.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from typing import Any

from policies.inventory import (
    GPU_RESOURCE,
    LOAD_ANNOTATION,
    MODEL_ANNOTATION,
    ROLE_ANNOTATION,
    SCHEDULER_NAME,
    SLO_ANNOTATION,
)
from sim.scenario import ServiceSpec

NAMESPACE = "inference"
_NS = uuidlib.UUID("0b7f3c2e-59a1-4d1e-8c44-6a2b1f0e9d77")


def pod_uid(seed: int, name: str) -> str:
    return str(uuidlib.uuid5(_NS, f"{seed}/{name}"))


def make_pod(
    svc: ServiceSpec,
    role: str,
    name: str,
    *,
    seed: int,
    rps: float,
    prompt: float,
    output: float,
    cpu: int,
    memory_gib: int,
    created: float,
) -> dict[str, Any]:
    kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
    args = [
        "--model",
        svc.model,
        "--kv-transfer-config",
        json.dumps({"kv_connector": "NixlConnector", "kv_role": kv_role}),
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": pod_uid(seed, name),
            "resourceVersion": "1",
            "creationTimestamp": f"{created:.3f}",
            "labels": {"app": svc.name, "llm-d.ai/role": role},
            # the service's prefill or decode ReplicaSet, as a Deployment's pods carry it
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{svc.name}-{role}",
                    "uid": pod_uid(seed, f"replicaset/{svc.name}-{role}"),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "annotations": {
                ROLE_ANNOTATION: role,
                MODEL_ANNOTATION: svc.model,
                LOAD_ANNOTATION: (
                    f"rps={max(rps, 0.001):.4g},prompt={max(round(prompt), 1)},"
                    f"output={max(round(output), 1)}"
                ),
                SLO_ANNOTATION: (
                    f"ttft={round(svc.slo.ttft_s * 1000)}ms,tpot={round(svc.slo.tpot_s * 1000)}ms"
                ),
            },
        },
        "spec": {
            "schedulerName": SCHEDULER_NAME,
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai:v0.11.0",
                    "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
                    "args": args,
                    "resources": {
                        "requests": {"cpu": str(cpu), "memory": f"{memory_gib}Gi"},
                        "limits": {GPU_RESOURCE: "1"},
                    },
                }
            ],
        },
        "status": {"phase": "Pending"},
    }
