"""`copack agent run` as a real process: fake NVML via --nvml-library, fake API server via
--kubeconfig, then gRPC, /metrics and the node annotation from the outside, and SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

import grpc
import pytest
import typer
from typer.testing import CliRunner

from node_agent import telemetry_pb2_grpc as pb_grpc
from node_agent.cli import register
from policies.inventory import AGENT_ANNOTATION, INVENTORY_ANNOTATION, Inventory
from tests.fakes import nvml as fake
from tests.node_agent.conftest import snapshot_or_none, wait_until

COPACK = [sys.executable, "-m", "copack.cli"]


def _copack_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "copack")
    return [exe] if os.path.exists(exe) else COPACK


def test_agent_run_end_to_end(tmp_path, fake_kube):
    nv = fake.FakeNvml(tmp_path, fake.scenario([
        fake.gpu("H100", 0, gpm=fake.gpm(sm=35, tensor=25)),
        fake.gpu("H100", 1, mig=fake.mig_layout("H100", 1, ["4g.40gb", "3g.40gb"])),
    ]))
    fake_kube.server.add_node("gpu-node-7")
    log = tmp_path / "agent.log"
    env = {**os.environ, **nv.env(), "PYTHONUNBUFFERED": "1"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    cmd = [*_copack_cmd(), "agent", "run", "--node", "gpu-node-7", "--interval", "0.2",
           "--nvml-library", str(nv.lib_path), "--grpc-listen", "127.0.0.1:0",
           "--metrics-listen", "127.0.0.1:0", "--kubeconfig", str(fake_kube.kubeconfig),
           "--pod-resources-socket", ""]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        line = wait_until(
            lambda: re.search(r"advertised [^:]+:(\d+)\), metrics :(\d+)", log.read_text()),
            timeout=60, what="the agent's start line",
        )
        grpc_port, metrics_port = int(line.group(1)), int(line.group(2))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = pb_grpc.TelemetryServiceStub(ch)
            snap = wait_until(
                lambda: (s := snapshot_or_none(stub))
                and all(u.sm_active.present for u in s.units) and s,
                what="readings over gRPC",
            )
        assert snap.node == "gpu-node-7"
        assert [u.mig_profile for u in snap.units] == ["", "4g.40gb", "3g.40gb"]
        assert snap.units[0].tensor_active.value == pytest.approx(0.25)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'copack_gpu_sm_active_ratio{gpu="0"' in text
        ann = wait_until(
            lambda: (fake_kube.server.get("nodes", "gpu-node-7")["metadata"].get("annotations")
                     or {}).get(INVENTORY_ANNOTATION) and
            fake_kube.server.get("nodes", "gpu-node-7")["metadata"]["annotations"],
            what="the inventory annotation",
        )
        assert len(Inventory.from_annotation(ann[INVENTORY_ANNOTATION]).units) == 3
        assert ann[AGENT_ANNOTATION].endswith(f":{grpc_port}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interval", "0.01"], "at least 0.1"),
        (["--grpc-listen", "nonsense"], "gRPC listen address must be HOST:PORT"),
        (["--metrics-listen", "127.0.0.1:99999"], "metrics listen address must be HOST:PORT"),
        (["--kubeconfig", "/nonexistent/kubeconfig"], "copack agent:"),
        (["--log-level", "chatty"], "unknown log level"),
        (["--watch-queue", "0"], "at least 1"),
    ],
)
def test_bad_flags_give_a_clear_error(args, message):
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["agent", "run", "--pod-resources-socket", "", *args])
    assert res.exit_code == 2
    assert message in res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit)
