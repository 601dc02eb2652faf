"""The fake API server must behave like the real one where copack depends on it, as seen
through the official client (FACTS.md #1-#4)."""

from __future__ import annotations

import threading
import time

import orjson
import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.fakes.kube_fixtures import FakeKube


def _pod(name: str, labels: dict[str, str] | None = None, node: str | None = None) -> dict:
    spec: dict = {
        "schedulerName": "copack-scheduler",
        "containers": [
            {"name": "main", "image": "vllm:1", "resources": {"limits": {"copack.io/gpu": "1"}}}
        ],
    }
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": spec}


def _binding(name: str, node: str, uid: str | None = None, **ann: str) -> client.V1Binding:
    return client.V1Binding(
        metadata=client.V1ObjectMeta(name=name, uid=uid, annotations=ann or None),
        target=client.V1ObjectReference(kind="Node", name=node),
    )


def test_list_get_and_selectors(fake_kube: FakeKube) -> None:
    s, core = fake_kube.server, fake_kube.core
    s.add_node("n1", labels={"gpu": "h100"})
    s.add_node("n2", labels={"gpu": "a100"})
    s.add_pod(_pod("a", {"app": "x"}))
    s.add_pod(_pod("b", {"app": "y"}, node="n1"))
    raw = core.list_pod_for_all_namespaces(_preload_content=False)
    body = orjson.loads(raw.data)
    assert body["kind"] == "PodList"
    assert int(body["metadata"]["resourceVersion"]) == s.resource_version
    assert all("kind" not in item for item in body["items"])  # FACTS #4
    assert [p.metadata.name for p in core.list_namespaced_pod("default",
            field_selector="spec.nodeName=").items] == ["a"]
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(
            field_selector="spec.nodeName=n1").items] == ["b"]
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(
            label_selector="app in (y,z)").items] == ["b"]
    assert [n.metadata.name for n in core.list_node(label_selector="gpu!=h100").items] == ["n2"]
    got = core.read_namespaced_pod("a", "default")
    assert got.kind == "Pod" and got.status.phase == "Pending"
    assert got.spec.containers[0].resources.requests == {"copack.io/gpu": "1"}
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod("nope", "default")
    assert e.value.status == 404
    with pytest.raises(ApiException) as e:
        core.list_pod_for_all_namespaces(field_selector="spec.bogus=1")
    assert e.value.status == 400


def test_paging_with_limit_and_continue(fake_kube: FakeKube) -> None:
    s, core = fake_kube.server, fake_kube.core
    for i in range(5):
        s.add_node(f"n{i}")
    first = core.list_node(limit=2)
    assert len(first.items) == 2 and first.metadata._continue
    names = [n.metadata.name for n in first.items]
    token = first.metadata._continue
    while token:
        page = core.list_node(limit=2, _continue=token)
        names += [n.metadata.name for n in page.items]
        token = page.metadata._continue
    assert names == [f"n{i}" for i in range(5)]


def test_binding_semantics(fake_kube: FakeKube) -> None:
    s, core = fake_kube.server, fake_kube.core
    uid = s.add_pod(_pod("p"))["metadata"]["uid"]
    # FACTS #1: the typed call fails on the 201 Status body although the pod got bound.
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod_binding(
            "p", "default", _binding("p", "n1", uid="wrong"), _preload_content=False
        )
    assert e.value.status == 409 and "Precondition failed" in e.value.body
    assert s.get("pods", "p", "default")["spec"].get("nodeName") is None
    resp = core.create_namespaced_pod_binding(
        "p", "default", _binding("p", "n1", uid=uid, **{"copack.io/unit": "GPU-1"}),
        _preload_content=False,
    )
    assert resp.status == 201
    assert orjson.loads(resp.data) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201
    }
    pod = s.get("pods", "p", "default")
    assert pod["spec"]["nodeName"] == "n1"
    assert pod["metadata"]["annotations"]["copack.io/unit"] == "GPU-1"
    assert any(c["type"] == "PodScheduled" for c in pod["status"]["conditions"])
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod_binding(
            "p", "default", _binding("p", "n2", uid=uid), _preload_content=False
        )
    assert e.value.status == 409 and "already assigned" in e.value.body
    assert s.get("pods", "p", "default")["spec"]["nodeName"] == "n1"


def test_patch_kinds_and_immutable_node_name(fake_kube: FakeKube) -> None:
    s, core = fake_kube.server, fake_kube.core
    s.add_pod(_pod("p"))
    core.patch_namespaced_pod("p", "default", {"metadata": {"annotations": {"a": "1"}}})
    core.patch_namespaced_pod(
        "p", "default", [{"op": "add", "path": "/metadata/annotations/copack.io~1unit",
                          "value": "GPU-9"}]
    )
    core.patch_namespaced_pod(
        "p", "default", {"metadata": {"annotations": {"a": None}}},
        _content_type="application/merge-patch+json",
    )
    ann = s.get("pods", "p", "default")["metadata"]["annotations"]
    assert ann == {"copack.io/unit": "GPU-9"}
    rv = s.resource_version
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_pod("p", "default", {"spec": {"nodeName": "n1"}})
    assert e.value.status == 422
    core.patch_namespaced_pod("p", "default", {"metadata": {"annotations": {"copack.io/unit":
                                                                              "GPU-9"}}})
    assert s.resource_version == rv  # no-op patch: no new version, no event
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_pod(
            "p", "default", {"metadata": {"resourceVersion": "1", "annotations": {"b": "2"}}}
        )
    assert e.value.status == 409
    node = s.add_node("n1")
    core.patch_node("n1", {"metadata": {"annotations": {"copack.io/agent": "10.0.0.1:50051"}}})
    assert s.get("nodes", "n1")["metadata"]["annotations"]["copack.io/agent"] == "10.0.0.1:50051"
    assert node["metadata"]["uid"] == s.get("nodes", "n1")["metadata"]["uid"]


def _collect(core: client.CoreV1Api, out: list, **kw: object) -> threading.Thread:
    def run() -> None:
        try:
            for ev in watch.Watch().stream(core.list_pod_for_all_namespaces, **kw):
                out.append((ev["type"], ev["raw_object"]["metadata"].get("name")))
        except Exception as e:  # recorded for the assertions
            out.append(("EXC", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_watch_events_selector_moves_and_drop(fake_kube: FakeKube) -> None:
    s, core = fake_kube.server, fake_kube.core
    s.add_pod(_pod("old"))
    events: list = []
    t = _collect(core, events, resource_version=str(s.resource_version),
                 field_selector="spec.nodeName=", allow_watch_bookmarks=True)
    s.wait_for_watches(1, "pods")
    s.add_pod(_pod("new"))
    s.bind("default", "new", "n1")  # leaves the selector: DELETED
    s.send_bookmark()
    _wait(lambda: len(events) >= 3)
    assert events[:3] == [("ADDED", "new"), ("DELETED", "new"), ("BOOKMARK", None)]
    s.drop_watches()
    t.join(5)
    assert events[-1][0] == "EXC"
    assert isinstance(events[-1][1], urllib3.exceptions.ProtocolError)  # FACTS #3


def test_watch_from_scratch_lists_current_objects(fake_kube: FakeKube) -> None:
    s, core = fake_kube.server, fake_kube.core
    s.add_pod(_pod("a"))
    s.add_pod(_pod("b"))
    events: list = []
    t = _collect(core, events, timeout_seconds=1)
    t.join(10)
    assert events == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_expired_resource_version_gives_410(fake_kube: FakeKube) -> None:
    s, core = fake_kube.server, fake_kube.core
    s.add_pod(_pod("a"))
    old = str(s.resource_version)
    s.add_pod(_pod("b"))
    s.expire_history()
    events: list = []
    _collect(core, events, resource_version=old).join(10)
    assert events and events[-1][0] == "EXC"
    assert isinstance(events[-1][1], ApiException) and events[-1][1].status == 410
    # the client retried once with the same version before raising (FACTS #3)
    assert len(s.requests_matching(verb="watch", resource="pods")) == 2


def test_faults_and_request_recording(fake_kube: FakeKube) -> None:
    s, core = fake_kube.server, fake_kube.core
    s.add_pod(_pod("p"))
    s.fail_next("patch", 2, 503)
    for _ in range(2):
        with pytest.raises(ApiException) as e:
            core.patch_namespaced_pod("p", "default", {"metadata": {"labels": {"x": "1"}}})
        assert e.value.status == 503
    core.patch_namespaced_pod("p", "default", {"metadata": {"labels": {"x": "1"}}})
    s.fail_next("bind", 1, 500, message="etcd timeout")
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod_binding("p", "default", _binding("p", "n1"),
                                           _preload_content=False)
    assert e.value.status == 500 and "etcd timeout" in e.value.body
    patches = s.requests_matching(verb="patch", resource="pods")
    assert [r.status for r in patches] == [503, 503, 200]
    assert patches[0].authorization == "Bearer fake-token"
    assert s.requests_matching(verb="create", subresource="binding")[0].status == 500
