"""`copack extender serve` as a real process: flags, kubeconfig, readiness, a full
filter/prioritize/bind round, and a clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fakes.kube_objects import binding_args, copack_pod, extender_args, gpu_node, gpu_units


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command_end_to_end(fake_kube, tmp_path) -> None:
    s = fake_kube.server
    for n in ("n0", "n1"):
        s.create("nodes", gpu_node(n, gpu_units(n, 2)))
    s.add_pod(copack_pod("p", role="prefill", demand="sm=0.5,bw=0.1,mem=20Gi"))
    config = tmp_path / "extender.yaml"
    config.write_text("policy:\n  name: complementary\nlisten:\n  host: 127.0.0.1\n")
    port = _free_port()
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "copack.cli", "extender", "serve", "--config", str(config),
         "--kubeconfig", str(fake_kube.kubeconfig), "--port", str(port), "--no-telemetry",
         "--log-level", "warning"],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "extender never became ready"
            time.sleep(0.1)
        pod = {"kind": "Pod", "apiVersion": "v1", **s.get("pods", "p", "default")}
        with httpx.Client(base_url=url, timeout=10) as c:
            feasible = c.post("/filter", content=orjson.dumps(
                extender_args(pod, ["n0", "n1"]))).json()["NodeNames"]
            assert feasible == ["n0", "n1"]
            scores = c.post("/prioritize", content=orjson.dumps(
                extender_args(pod, feasible))).json()
            assert [x["Host"] for x in scores] == ["n0", "n1"]
            assert c.post("/bind", content=orjson.dumps(
                binding_args(pod, "n1"))).json() == {"Error": ""}
        bound = s.get("pods", "p", "default")
        assert bound["spec"]["nodeName"] == "n1"
        assert bound["metadata"]["annotations"]["copack.io/unit"].startswith("GPU-n1-")
        # the verbs it used are the RBAC it needs: list/watch nodes+pods, create pods/binding
        used = {(r.verb, r.resource, r.subresource) for r in s.requests}
        assert {("list", "nodes", None), ("watch", "nodes", None), ("list", "pods", None),
                ("watch", "pods", None), ("create", "pods", "binding")} <= used
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0
