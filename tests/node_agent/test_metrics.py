"""Prometheus /metrics over real HTTP, with pod attribution from a fake kubelet pod-resources
server on a unix socket."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import nvml as fake
from tests.fakes.podresources import FakePodResources, PodAssignment
from tests.node_agent.conftest import snapshot_or_none, wait_readings, wait_until

UNIT_LABELS = {"node", "gpu", "uuid", "mig_profile", "gpu_instance_id", "source"}
RATIOS = ("copack_gpu_sm_active_ratio", "copack_gpu_dram_bw_active_ratio",
          "copack_gpu_tensor_active_ratio", "copack_gpu_sm_occupancy_ratio")


def scrape(agent) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def series(m: dict[str, list], name: str) -> dict[str, tuple[dict, float]]:
    return {s.labels["uuid"]: (s.labels, s.value) for s in m.get(name, [])}


def test_metric_names_labels_and_ratios(nvml, make_agent):
    mig = fake.mig_layout("H100", 1, ["3g.40gb", "4g.40gb"])
    mig[0]["gpm"] = fake.gpm(75, 50, 60, 25)
    mig[0]["memory_used"] = 2 * fake.GIB
    nvml.write(fake.scenario([
        fake.gpu("H100", 0, gpm=fake.gpm(40, 20, 30, 50), memory_used=fake.GIB),
        fake.gpu("H100", 1, mig=mig),
        fake.gpu("L40S", 2, utilization=(80, 35)),
    ]))
    agent = make_agent()
    wait_readings(agent.sampler)
    m = scrape(agent)
    for name in (*RATIOS, "copack_gpu_memory_used_bytes", "copack_gpu_memory_total_bytes",
                 "copack_gpu_healthy"):
        for labels, value in series(m, name).values():
            assert set(labels) == UNIT_LABELS, name
            if name in RATIOS:
                assert 0.0 <= value <= 1.0, (name, value)
    sm = series(m, "copack_gpu_sm_active_ratio")
    g0_labels, g0 = sm[fake.gpu_uuid(0)]
    assert g0 == pytest.approx(0.40)
    assert g0_labels == {"node": "node-a", "gpu": "0", "uuid": fake.gpu_uuid(0),
                         "mig_profile": "", "gpu_instance_id": "", "source": "gpm"}
    mig_labels, mig_sm = sm[mig[0]["uuid"]]
    assert mig_sm == pytest.approx(0.75)
    assert (mig_labels["gpu"], mig_labels["mig_profile"], mig_labels["gpu_instance_id"]) == (
        "1", "3g.40gb", "1")
    assert series(m, "copack_gpu_tensor_active_ratio")[mig[0]["uuid"]][1] == pytest.approx(0.6)
    assert series(m, "copack_gpu_sm_occupancy_ratio")[mig[0]["uuid"]][1] == pytest.approx(0.5)
    assert series(m, "copack_gpu_dram_bw_active_ratio")[mig[0]["uuid"]][1] == pytest.approx(0.25)
    assert series(m, "copack_gpu_memory_used_bytes")[mig[0]["uuid"]][1] == 2 * fake.GIB
    assert series(m, "copack_gpu_memory_total_bytes")[mig[0]["uuid"]][1] == 42412802048
    # Coarse: sm/dram from utilization rates, no tensor or occupancy series at all.
    l40s = fake.gpu_uuid(2)
    assert sm[l40s][0]["source"] == "coarse" and sm[l40s][1] == pytest.approx(0.80)
    assert series(m, "copack_gpu_dram_bw_active_ratio")[l40s][1] == pytest.approx(0.35)
    assert l40s not in series(m, "copack_gpu_tensor_active_ratio")
    assert l40s not in series(m, "copack_gpu_sm_occupancy_ratio")
    # Exactly one series per unit per metric, and every unit healthy.
    healthy = series(m, "copack_gpu_healthy")
    assert len(m["copack_gpu_healthy"]) == len(healthy) == 4
    assert all(v == 1.0 for _, v in healthy.values())
    assert m["copack_agent_nvml_up"][0].value == 1.0


def test_a_failed_unit_keeps_its_healthy_series_at_zero(nvml, make_agent):
    gpus = [fake.gpu("H100", 0, gpm=fake.gpm(sm=10)), fake.gpu("H100", 1, gpm=fake.gpm(sm=20))]
    nvml.write(fake.scenario(gpus))
    agent = make_agent()
    wait_until(lambda: len(series(scrape(agent), "copack_gpu_sm_active_ratio")) == 2,
               what="both GPUs reporting")
    gpus[0]["lost"] = True
    nvml.write(fake.scenario(gpus))
    wait_until(lambda: series(scrape(agent), "copack_gpu_healthy")[fake.gpu_uuid(0)][1] == 0.0,
               what="GPU 0 unhealthy")
    for _ in range(3):  # it stays there, tick after tick, with the same labels
        seq = agent.sampler.latest().sequence
        wait_until(lambda s=seq: agent.sampler.latest().sequence > s, what="another tick")
        m = scrape(agent)
        labels, value = series(m, "copack_gpu_healthy")[fake.gpu_uuid(0)]
        assert value == 0.0 and labels["source"] == "gpm"
        assert fake.gpu_uuid(0) not in series(m, "copack_gpu_sm_active_ratio")  # no stale value
        assert fake.gpu_uuid(0) not in series(m, "copack_gpu_memory_used_bytes")
        assert series(m, "copack_gpu_healthy")[fake.gpu_uuid(1)][1] == 1.0
        assert series(m, "copack_gpu_sm_active_ratio")[fake.gpu_uuid(1)][1] == pytest.approx(0.2)


def test_pod_attribution_from_the_kubelet_pod_resources_api(nvml, make_agent, tmp_path):
    mig = fake.mig_layout("H100", 1, ["3g.40gb", "3g.40gb"])
    nvml.write(fake.scenario([fake.gpu("H100", 0, gpm=fake.gpm(sm=10)),
                              fake.gpu("H100", 1, mig=mig)]))
    sock = tmp_path / "kubelet.sock"
    with FakePodResources(sock) as kubelet:
        kubelet.set_pods([
            # copack slots on GPU 0: a prefill and a decode pod share it.
            PodAssignment("llm", "prefill-0", "vllm", "copack.io/gpu", [f"{fake.gpu_uuid(0)}::0"]),
            PodAssignment("llm", "decode-0", "vllm", "copack.io/gpu", [f"{fake.gpu_uuid(0)}::3"]),
            # NVIDIA's MIG resource names the MIG UUID directly.
            PodAssignment("batch", "job-1", "main", "nvidia.com/mig-3g.40gb", [mig[1]["uuid"]]),
            PodAssignment("batch", "job-1", "sidecar", "example.com/nic", ["eth7"]),
        ])
        agent = make_agent(pod_resources_socket=str(sock), pod_refresh_s=0.1)

        def pod_info():
            return [s for s in scrape(agent).get("copack_gpu_unit_pod_info", [])]

        info = wait_until(lambda: len(pod_info()) == 3 and pod_info(), what="pod info series")
        got = {(s.labels["uuid"], s.labels["namespace"], s.labels["pod"], s.labels["container"])
               for s in info}
        assert got == {(fake.gpu_uuid(0), "llm", "prefill-0", "vllm"),
                       (fake.gpu_uuid(0), "llm", "decode-0", "vllm"),
                       (mig[1]["uuid"], "batch", "job-1", "main")}
        for s in info:
            assert s.value == 1.0 and set(s.labels) >= UNIT_LABELS
        mig_info = next(s for s in info if s.labels["uuid"] == mig[1]["uuid"])
        assert mig_info.labels["mig_profile"] == "3g.40gb" and mig_info.labels["gpu"] == "1"
        # Unit series stay one per unit: pods never multiply them.
        wait_readings(agent.sampler)
        healthy = scrape(agent)["copack_gpu_healthy"]
        assert len(healthy) == len({s.labels["uuid"] for s in healthy}) == 3
        # Pods also ride on the gRPC stream.
        from node_agent import telemetry_pb2_grpc as pb_grpc

        with grpc.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as ch:
            snap = wait_until(
                lambda: (s := snapshot_or_none(pb_grpc.TelemetryServiceStub(ch)))
                and any(u.pods for u in s.units) and s,
                what="pods in the snapshot",
            )
        pods0 = next(u.pods for u in snap.units if u.uuid == fake.gpu_uuid(0))
        assert {(p.namespace, p.pod, p.container) for p in pods0} == {
            ("llm", "prefill-0", "vllm"), ("llm", "decode-0", "vllm")}
        # The decode pod leaves: its series goes; a kubelet outage keeps the last answer.
        kubelet.set_pods([PodAssignment("llm", "prefill-0", "vllm", "copack.io/gpu",
                                        [f"{fake.gpu_uuid(0)}::0"])])
        wait_until(lambda: len(pod_info()) == 1, what="the decode pod to leave")
        kubelet.fail(grpc.StatusCode.UNAVAILABLE)
        calls = kubelet.list_calls
        wait_until(lambda: kubelet.list_calls > calls + 2, what="polls during the outage")
        assert [s.labels["pod"] for s in pod_info()] == ["prefill-0"]


def test_metrics_server_answers_healthz_and_404(nvml, make_agent):
    agent = make_agent()
    base = f"http://127.0.0.1:{agent.metrics_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
        assert r.read() == b"ok\n"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{base}/nope", timeout=5)
    assert e.value.code == 404
