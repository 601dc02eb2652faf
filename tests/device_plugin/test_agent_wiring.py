"""The wiring `copack agent run --device-plugin` uses: the agent's Sampler as unit source, the
device plugin's metrics served by the agent's own /metrics."""

from __future__ import annotations

from pathlib import Path

import httpx

from node_agent.agent import Agent, AgentConfig
from node_agent.device_plugin.metrics import DevicePluginCollector
from node_agent.device_plugin.service import DevicePluginService
from node_agent.sampler import SamplerConfig
from tests.device_plugin.conftest import NODE
from tests.fakes import nvml as fake


def test_agent_sampler_and_metrics_carry_the_device_plugin(rig_factory, tmp_path: Path):
    nv = fake.FakeNvml(tmp_path, fake.scenario([fake.gpu("H100", 0), fake.gpu("H100", 1)]))
    nv.install()
    agent = Agent(AgentConfig(
        sampler=SamplerConfig(node=NODE, nvml_library=str(nv.lib_path), interval_s=0.1,
                              rescan_interval_s=0.3, nvml_retry_s=0.1),
        grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0",
        pod_resources_socket=None, publish_inventory=False,
    ))
    rig = rig_factory(start=False)
    svc = DevicePluginService(rig.config, agent.sampler, rig.kube.api_client)
    agent.metrics.registry.register(DevicePluginCollector())
    agent.start()
    svc.start()
    try:
        assert rig.kubelet.wait_registered(10)
        assert rig.kubelet.wait_devices(lambda d: len(d) == 2 * rig.config.slots_per_unit)
        rig.create_bound("served", fake.gpu_uuid(1), share=55)
        res = rig.kubelet.admit(rig.kubelet_pod("served"))
        assert res.env["NVIDIA_VISIBLE_DEVICES"] == fake.gpu_uuid(1)
        body = httpx.get(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=5).text
        assert "copack_device_plugin_registered 1.0" in body
        assert 'copack_device_plugin_allocations_total{result="ok"}' in body
        assert "copack_gpu_healthy" in body
    finally:
        svc.stop()
        agent.stop()
