"""Fixtures for the extender's tests: the shared fake API server, uvicorn on loopback around an
app whose state the test feeds, and a binder that records what it was asked."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI

from extender.app import create_app
from extender.binder import BindError
from extender.config import ExtenderConfig
from extender.state import ClusterState
from policies.config import PolicyConfig
from tests.fakes.kube_fixtures import fake_kube  # noqa: F401  (re-exported fixture)


@dataclass
class RecordingBinder:
    """A Binder at the machine's edge: remembers bindings; can be told to fail."""

    calls: list[tuple[str, str, str, str, dict[str, str]]] = field(default_factory=list)
    fail_with: BindError | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bind(self, namespace: str, name: str, uid: str, node: str,
             annotations: dict[str, str]) -> None:
        with self.lock:
            if self.fail_with is not None:
                raise self.fail_with
            self.calls.append((namespace, name, uid, node, dict(annotations)))


class Clock:
    """A settable clock for the state (the simulator's seam)."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Served:
    url: str
    client: httpx.Client
    app: FastAPI

    def post(self, verb: str, body: Any) -> httpx.Response:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        return self.client.post(f"/{verb}", content=data,
                                headers={"Content-Type": "application/json"})


def serve_app(app: FastAPI) -> tuple[str, Callable[[], None]]:
    """uvicorn on an ephemeral loopback port, in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           access_log=False))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        t.join(10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


class ApiObjects:
    """Objects exactly as the API serves them (defaults, uid, resourceVersion), from the fake
    API server's store without HTTP: what kube-scheduler would put in ExtenderArgs."""

    def __init__(self) -> None:
        from tests.fakes.kube_apiserver import FakeKubeApiServer

        self._store = FakeKubeApiServer()

    def pod(self, body: dict[str, Any]) -> dict[str, Any]:
        obj = self._store.add_pod(body)
        return {"kind": "Pod", "apiVersion": "v1", **obj}

    def node(self, body: dict[str, Any]) -> dict[str, Any]:
        obj = self._store.create("nodes", body)
        return {"kind": "Node", "apiVersion": "v1", **obj}

    def annotate_node(self, name: str, annotations: dict[str, str]) -> dict[str, Any]:
        obj = self._store.patch("nodes", name, {"metadata": {"annotations": annotations}},
                                patch_type="merge")
        return {"kind": "Node", "apiVersion": "v1", **obj}

    def bind(self, pod: dict[str, Any], node: str, annotations: dict[str, str]) -> dict[str, Any]:
        meta = pod["metadata"]
        self._store.bind(meta["namespace"], meta["name"], node, meta["uid"], annotations)
        obj = self._store.get("pods", meta["name"], meta["namespace"])
        assert obj is not None
        return {"kind": "Pod", "apiVersion": "v1", **obj}


@pytest.fixture
def api() -> ApiObjects:
    return ApiObjects()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def binder() -> RecordingBinder:
    return RecordingBinder()


@pytest.fixture
def make_served(
    clock: Clock, binder: RecordingBinder
) -> Iterator[Callable[..., tuple[ClusterState, Served]]]:
    stops: list[Callable[[], None]] = []
    clients: list[httpx.Client] = []

    def make(policy: PolicyConfig | None = None, config: ExtenderConfig | None = None,
             synced: bool = True) -> tuple[ClusterState, Served]:
        state = ClusterState(policy or PolicyConfig(), now=clock)
        if synced:
            state.mark_synced()
        app = create_app(state, config or ExtenderConfig(), binder)
        url, stop = serve_app(app)
        stops.append(stop)
        client = httpx.Client(base_url=url, timeout=10)
        clients.append(client)
        return state, Served(url, client, app)

    yield make
    for c in clients:
        c.close()
    for s in stops:
        s()
