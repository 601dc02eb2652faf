"""pytest fixtures around the fake Kubernetes API server.

Use from a component's conftest.py:  `from tests.fakes.kube_fixtures import fake_kube  # noqa: F401`
then take `fake_kube` in a test: a `FakeKube(server, kubeconfig, api_client)` whose api_client is
the official client configured through the generated kubeconfig, exactly as a component would
load it (`kubernetes.config.new_client_from_config`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from tests.fakes.kube_apiserver import FakeKubeApiServer
from tests.fakes.polling import eventually  # noqa: F401  (re-exported for the kube tests)


class FakeKube(NamedTuple):
    server: FakeKubeApiServer
    kubeconfig: Path
    api_client: k8s_client.ApiClient

    @property
    def core(self) -> k8s_client.CoreV1Api:
        return k8s_client.CoreV1Api(self.api_client)


def start_fake_kube(directory: Path, **server_kwargs: object) -> FakeKube:
    """Start a server and write its kubeconfig into `directory` (for non-fixture use)."""
    server = FakeKubeApiServer(**server_kwargs).start()  # type: ignore[arg-type]
    kubeconfig = server.write_kubeconfig(directory / "kubeconfig")
    api_client = k8s_config.new_client_from_config(config_file=str(kubeconfig))
    return FakeKube(server, kubeconfig, api_client)


@pytest.fixture
def fake_kube(tmp_path: Path) -> Iterator[FakeKube]:
    kube = start_fake_kube(tmp_path)
    try:
        yield kube
    finally:
        kube.api_client.close()
        kube.server.stop()
