"""20 pods bound at once by 20 threads through the official client while the kubelet admits
them as they land (one at a time, as its HandlePodAdditions loop does): the plugin's watch lags
the kubelet, assignments arrive out of order, and every pod still gets its own unit and share."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ProtocolError

from node_agent.device_plugin.allocations import ALLOCATED_ANNOTATION, AllocationRecord
from policies.inventory import (
    ASSIGNED_AT_ANNOTATION,
    SM_SHARE_ANNOTATION,
    UNIT_ANNOTATION,
)
from tests.device_plugin.conftest import NODE, at, gpu_uuid, pod_manifest, rfc3339
from tests.fakes.kubelet import KubeletPod

N_PODS = 20


def retried(call, *args, **kwargs):
    """Like a real scheduler's client: a connection reset is retried; a 409 on the retry means
    the first attempt had gone through."""
    for attempt in range(5):
        try:
            return call(*args, **kwargs)
        except ProtocolError:
            if attempt == 4:
                raise
        except ApiException as e:
            if e.status != 409 or attempt == 0:
                raise
            return None
    return None


def test_twenty_pods_bound_concurrently_each_get_their_own_assignment(rig_factory):
    rig = rig_factory(n_units=8, slots=4)
    core = client.CoreV1Api(rig.kube.api_client)
    rng = random.Random(7)
    minutes = list(range(N_PODS))
    rng.shuffle(minutes)  # assignment order unrelated to creation or binding order
    plan = {
        f"pod-{i:02d}": (gpu_uuid(i % 8), 5 + 4 * i, at(minutes[i])) for i in range(N_PODS)
    }

    def place(name: str) -> None:
        unit, share, when = plan[name]
        retried(core.create_namespaced_pod, "default", pod_manifest(name))
        body = client.V1Binding(
            metadata=client.V1ObjectMeta(name=name, annotations={
                UNIT_ANNOTATION: unit, SM_SHARE_ANNOTATION: str(share),
                ASSIGNED_AT_ANNOTATION: rfc3339(when),
            }),
            target=client.V1ObjectReference(kind="Node", name=NODE),
        )
        resp = retried(core.create_namespaced_pod_binding, name, "default", body,
                       _preload_content=False)
        assert resp is None or resp.status == 201
        assert rig.kube.server.get("pods", name, "default")["spec"]["nodeName"] == NODE

    results = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def kubelet_loop() -> None:
        try:
            admit_as_they_land()
        except BaseException as e:
            errors.append(e)

    def admit_as_they_land() -> None:
        # The kubelet's own view: pods bound to its node, admitted in batches as they appear.
        while len(results) < N_PODS:
            all_bound = done.is_set()  # read before listing: a pass after it sees every pod
            batch = [KubeletPod.from_api(p) for p in rig.kube.server.list("pods", "default")
                     if p["spec"].get("nodeName") == NODE
                     and f"default/{p['metadata']['name']}" not in results]
            for r in rig.kubelet.admit_many(batch):
                results[r.key] = r
            if not batch:
                if all_bound:
                    break
                done.wait(0.005)

    admitter = threading.Thread(target=kubelet_loop, daemon=True)
    admitter.start()
    with ThreadPoolExecutor(max_workers=N_PODS) as pool:
        list(pool.map(place, plan))
    done.set()
    admitter.join(timeout=60)
    assert not admitter.is_alive()
    assert not errors, errors

    assert len(results) == N_PODS
    for name, (unit, share, _) in plan.items():
        r = results[f"default/{name}"]
        assert r.admitted, (name, r.error)
        assert r.env["NVIDIA_VISIBLE_DEVICES"] == unit, name
        assert r.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == str(share), name
        rec = AllocationRecord.from_annotation(rig.annotation(name, ALLOCATED_ANNOTATION))
        assert (rec.unit, rec.sm_share) == (unit, share)
    held = [d for r in results.values() for d in r.containers["vllm"].devices]
    assert len(held) == len(set(held)) == N_PODS
