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
