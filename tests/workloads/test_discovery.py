"""Backend discovery by label selector: the official client against the in-repo fake API server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.fakes.kube_fixtures import FakeKube
from tests.workloads.stub_vllm import ServerThread
from workloads.balancer import BackendPool
from workloads.discovery import KubeDiscovery, KubeSelector, endpoints_from_pod_list
from workloads.proxy import PDProxy, ProxyConfig


def pod(name: str, role: str, ip: str | None, *, ready: bool = True, ns: str = "llm") -> dict:
    status: dict[str, Any] = {"phase": "Running" if ip else "Pending"}
    if ip:
        status["podIP"] = ip
        status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"app.kubernetes.io/instance": "m", "app.kubernetes.io/component": role},
        },
        "spec": {"containers": [{"name": "vllm", "image": "x"}]},
        "status": status,
    }


def selectors(pre: BackendPool, dec: BackendPool) -> list[KubeSelector]:
    base = "app.kubernetes.io/instance=m,app.kubernetes.io/component="
    return [
        KubeSelector(pre, "llm", base + "prefill", 8000),
        KubeSelector(dec, "llm", base + "decode", 8000),
    ]


def test_only_ready_running_pods_with_an_ip_become_backends(fake_kube: FakeKube) -> None:
    s = fake_kube.server
    s.add_pod(pod("p1", "prefill", "10.0.0.1"))
    s.add_pod(pod("p2", "prefill", "10.0.0.2", ready=False))
    s.add_pod(pod("p3", "prefill", None))
    s.add_pod(pod("d1", "decode", "10.0.1.1"))
    s.add_pod(pod("d2", "decode", "fd00::5"))
    s.add_pod(pod("x1", "decode", "10.9.9.9", ns="other"))
    pre, dec = BackendPool("prefill"), BackendPool("decode")
    disc = KubeDiscovery(fake_kube.api_client, selectors(pre, dec))
    disc.refresh_once()
    assert [b.url for b in pre.backends] == ["http://10.0.0.1:8000"]
    assert sorted(b.url for b in dec.backends) == ["http://10.0.1.1:8000", "http://[fd00::5]:8000"]

    # Pods come and go; the pool follows and keeps the counters of the ones that stay.
    dec.acquire()
    s.delete("pods", "d2", namespace="llm")
    s.add_pod(pod("d3", "decode", "10.0.1.3"))
    disc.refresh_once()
    urls = {b.url: b for b in dec.backends}
    assert set(urls) == {"http://10.0.1.1:8000", "http://10.0.1.3:8000"}
    assert sum(b.outstanding for b in dec.backends) <= 1


def test_api_errors_keep_the_last_backends(fake_kube: FakeKube) -> None:
    fake_kube.server.add_pod(pod("d1", "decode", "10.0.1.1"))
    pre, dec = BackendPool("prefill"), BackendPool("decode")
    disc = KubeDiscovery(fake_kube.api_client, selectors(pre, dec), interval_s=0.01)

    async def run() -> None:
        loop = disc.loop()
        await anext(loop)
        assert [b.url for b in dec.backends] == ["http://10.0.1.1:8000"]
        fake_kube.server.fail_next("list", count=1, status=500)
        await anext(loop)
        assert disc._failing
        assert [b.url for b in dec.backends] == ["http://10.0.1.1:8000"]
        await anext(loop)
        assert not disc._failing
        await loop.aclose()

    asyncio.run(run())


def test_proxy_serves_through_discovered_backends(fake_kube: FakeKube) -> None:
    from tests.workloads.stub_vllm import create_stub_app

    app, _state = create_stub_app("d")
    backend = ServerThread(app).start()
    try:
        # The stub listens on loopback: its "pod IP" is 127.0.0.1 and the port is its own.
        fake_kube.server.add_pod(pod("d1", "decode", "127.0.0.1"))
        proxy = PDProxy(ProxyConfig())
        selector = "app.kubernetes.io/component=decode"
        sel = [KubeSelector(proxy.decode, "llm", selector, backend.port)]
        proxy.add_background(KubeDiscovery(fake_kube.api_client, sel, interval_s=0.05).loop)
        server = ServerThread(proxy.app).start()
        try:
            with httpx.Client(base_url=server.url, timeout=10) as c:
                for _ in range(100):
                    if c.get("/health").status_code == 200:
                        break
                    time.sleep(0.05)
                r = c.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 2})
                assert r.status_code == 200, r.text
        finally:
            server.stop()
    finally:
        backend.stop()


@pytest.mark.parametrize("body", [{}, {"items": None}, {"items": [None, 3, {"status": None}]}])
def test_odd_list_bodies_give_no_backends(body: dict) -> None:
    assert endpoints_from_pod_list(body, 8000) == []


def _deleting(p: dict, deadline: str) -> dict:
    p["metadata"]["deletionTimestamp"] = deadline
    return p


NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
IN_60S, IN_5S = "2027-01-15T08:01:00Z", "2027-01-15T08:00:05Z"


def test_a_prefill_pod_being_deleted_hands_over_while_its_replacement_starts() -> None:
    old = _deleting(pod("p1", "prefill", "10.0.0.1"), IN_60S)
    other = pod("p2", "prefill", "10.0.0.2")
    loading = pod("p3", "prefill", "10.0.0.3", ready=False)
    pending = pod("p4", "prefill", None)
    url1 = "http://10.0.0.1:8000"

    def urls(*pods: dict, drain: float | None = 10.0, now: float = NOW) -> list[str]:
        return endpoints_from_pod_list({"items": list(pods)}, 8000, drain, now)

    assert url1 in urls(old, other, loading)  # replacement loading its model
    assert url1 in urls(old, other, pending)  # replacement not even scheduled yet
    assert url1 not in urls(old, other, pod("p3", "prefill", "10.0.0.3"))  # it is Ready
    assert url1 not in urls(old, other, loading, drain=None)  # decode selectors: no handover
    assert url1 not in urls(old, other, loading, drain=70.0)  # too close to its deadline
    assert url1 not in urls(_deleting(pod("p1", "prefill", "10.0.0.1"), IN_5S), loading)
    gone = _deleting(pod("p1", "prefill", "10.0.0.1", ready=False), IN_60S)
    assert url1 not in urls(gone, loading)  # its server stopped answering its probe
    odd = _deleting(pod("p1", "prefill", "10.0.0.1"), "soon")
    assert url1 not in urls(odd, loading)  # a deadline it cannot read: no handover
    # a starting pod being deleted itself is no replacement
    assert url1 not in urls(old, _deleting(pod("p5", "prefill", None), IN_60S))


def test_handover_through_the_api_server(fake_kube: FakeKube) -> None:
    s = fake_kube.server
    s.add_pod(pod("p1", "prefill", "10.0.0.1"))
    s.add_pod(pod("p0", "prefill", "10.0.0.9"))
    s.begin_termination("llm", "p1", grace_s=600)  # evicted: its grace period runs
    s.begin_termination("llm", "p0", grace_s=600)
    s.add_pod(pod("p2", "prefill", None))  # p1's replacement, pending
    pre, dec = BackendPool("prefill"), BackendPool("decode")
    sels = selectors(pre, dec)
    sels[0].handover_drain_s = 10.0
    disc = KubeDiscovery(fake_kube.api_client, sels)
    disc.refresh_once()
    assert [b.url for b in pre.backends] == ["http://10.0.0.1:8000", "http://10.0.0.9:8000"]
    s.delete("pods", "p2", namespace="llm")
    s.add_pod(pod("p2", "prefill", "10.0.0.2"))  # the replacement is Ready: hand-over ends
    disc.refresh_once()
    assert [b.url for b in pre.backends] == ["http://10.0.0.2:8000"]
    sels[0].handover_drain_s = None  # no handover: a pod being deleted is never a backend
    s.delete("pods", "p2", namespace="llm")
    s.add_pod(pod("p2", "prefill", None))
    disc.refresh_once()
    assert [b.url for b in pre.backends] == []
