"""`copack agent run --device-plugin` as a real process: the agent's sampler (fake NVML) feeds the
device plugin, which registers with a fake kubelet and advertises slots of every unit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import urllib.request

from tests.fakes import nvml as fake
from tests.fakes.kubelet import FakeKubelet
from tests.node_agent.conftest import wait_until
from tests.node_agent.test_cli import _copack_cmd


def test_agent_run_serves_the_device_plugin(tmp_path, fake_kube):
    nv = fake.FakeNvml(tmp_path / "nvml", fake.scenario([
        fake.gpu("H100", 0),
        fake.gpu("H100", 1, mig=fake.mig_layout("H100", 1, ["4g.40gb", "3g.40gb"])),
    ]))
    fake_kube.server.add_node("gpu-node-3")
    plugin_dir = tmp_path / "device-plugins"
    log = tmp_path / "agent.log"
    env = {**os.environ, **nv.env(), "PYTHONUNBUFFERED": "1"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    with FakeKubelet(plugin_dir) as kubelet:
        cmd = [*_copack_cmd(), "agent", "run", "--node", "gpu-node-3", "--interval", "0.2",
               "--nvml-library", str(nv.lib_path), "--grpc-listen", "127.0.0.1:0",
               "--metrics-listen", "127.0.0.1:0", "--kubeconfig", str(fake_kube.kubeconfig),
               "--pod-resources-socket", "", "--device-plugin", "--slots-per-unit", "3",
               "--device-plugin-dir", str(plugin_dir)]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            assert kubelet.wait_registered(timeout=60), log.read_text()
            devices = kubelet.devices()
            units = {d.split("::")[0] for d in devices}
            assert len(units) == 3 and len(devices) == 9
            assert set(devices.values()) == {"Healthy"}
            port = int(re.search(r"metrics :(\d+)", log.read_text()).group(1))
            text = wait_until(
                lambda: urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode(),
                what="/metrics")
            assert "copack_device_plugin" in text
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
