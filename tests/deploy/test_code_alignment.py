"""The manifests agree with the code's own defaults: the agent's listen ports and kubelet
socket paths, the device plugin's socket directory, the extender's verbs and probe paths."""

from __future__ import annotations

from pathlib import PurePosixPath

import typer
from typer.main import get_command

from tests.deploy.manifests import one, pod_spec, render
from tests.deploy.test_scheduler_config import scheduler_config


def _agent_run_defaults() -> dict[str, object]:
    from node_agent.cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a group, so `agent` is addressable by name
    run = get_command(app).commands["agent"].commands["run"]
    return {p.name: p.default for p in run.params}


def _agent_container() -> tuple[dict, dict]:
    spec = pod_spec(one(render("base"), "DaemonSet", "copack-agent"))
    return spec, spec["containers"][0]


def _mount_for(path: str, container: dict) -> dict | None:
    p = PurePosixPath(path)
    for m in container["volumeMounts"]:
        if p.is_relative_to(m["mountPath"]):
            return m
    return None


def test_agent_ports_are_the_cli_defaults() -> None:
    defaults = _agent_run_defaults()
    _, c = _agent_container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(str(defaults["grpc_listen"]).rsplit(":", 1)[1]) == ports["grpc"] == 50051
    assert int(str(defaults["metrics_listen"]).rsplit(":", 1)[1]) == ports["metrics"] == 9400
    # Listening on all addresses: the extender connects to the pod IP.
    assert str(defaults["grpc_listen"]).startswith("0.0.0.0:")


def test_agent_runs_its_device_plugin_where_the_kubelet_looks() -> None:
    defaults = _agent_run_defaults()
    _, c = _agent_container()
    assert "--device-plugin" in c["args"]  # off by default in the CLI
    assert defaults["device_plugin"] is False
    m = _mount_for(str(defaults["device_plugin_dir"]), c)
    assert m is not None and m["mountPath"] == defaults["device_plugin_dir"]


def test_kubelet_sockets_the_code_uses_are_mounted() -> None:
    from node_agent.device_plugin.config import DEFAULT_POD_RESOURCES_SOCKET, DEFAULT_SOCKET_DIR
    from node_agent.pod_attribution import DEFAULT_SOCKET

    spec, c = _agent_container()
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    for path in (DEFAULT_SOCKET, DEFAULT_POD_RESOURCES_SOCKET):
        m = _mount_for(path, c)
        assert m is not None and host[m["name"]] == m["mountPath"], path
    m = _mount_for(DEFAULT_SOCKET_DIR, c)
    assert m is not None and m["mountPath"] == DEFAULT_SOCKET_DIR == host[m["name"]]
    assert not m.get("readOnly"), "the device plugin creates its socket there"
    assert str(_agent_run_defaults()["pod_resources_socket"]) == DEFAULT_SOCKET


def test_extender_serves_the_verbs_and_probes_the_manifests_use() -> None:
    from starlette.testclient import TestClient

    from extender.app import create_app
    from extender.config import ExtenderConfig
    from extender.state import ClusterState

    app = create_app(ClusterState(), ExtenderConfig(), None)
    paths = {r.path for r in app.routes}
    (ext,) = scheduler_config(render("base"))["extenders"]
    with TestClient(app) as client:  # the verbs sit in front of the routes (fast_path.py)
        for verb in (ext["filterVerb"], ext["prioritizeVerb"], ext["bindVerb"]):
            r = client.post(f"/{verb}", content=b"")
            assert r.status_code == 400 and r.json()["Error"].startswith(f"{verb}: "), verb
    c = pod_spec(one(render("base"), "Deployment", "copack-extender"))["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] in paths
    assert c["livenessProbe"]["httpGet"]["path"] in paths
    assert "/metrics" in paths


def test_extender_config_elects_a_leader_on_a_lease_its_role_covers() -> None:
    """The rendered config loads, enables leader election with the identity from the
    downward API, on a Lease in the namespace where the extender's Role grants leases."""
    import yaml

    from extender.config import validate_config
    from tests.deploy.manifests import find

    objs = render("base")
    (cm,) = [c for c in find(objs, "ConfigMap")
             if c["metadata"]["name"].startswith("copack-extender-config")]
    raw = yaml.safe_load(cm["data"]["extender.yaml"])  # (its TLS files exist in the pod only)
    le = validate_config({"leader_election": raw["leader_election"]}).leader_election
    assert le.enabled and le.identity is None  # -> $POD_NAME
    assert le.renew_deadline_s < le.lease_duration_s
    role = one(objs, "Role", "copack-extender-leader-election")
    assert role["metadata"]["namespace"] == le.lease_namespace
    assert [r["resources"] for r in role["rules"]] == [["leases"], ["pods"]]
    dep = one(objs, "Deployment", "copack-extender")
    env = {e["name"]: e for e in pod_spec(dep)["containers"][0]["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # the pod labelled is the replica's own, in the namespace of the Role granting the patch
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert le.route_label and dep["metadata"]["namespace"] == role["metadata"]["namespace"]
    from extender.role_label import ROLE_LABEL

    svc = one(objs, "Service", "copack-extender")
    assert svc["spec"]["selector"][ROLE_LABEL] == "leader"


def test_rebalancer_runs_a_command_with_the_port_and_probes_it_serves() -> None:
    from rebalancer.cli import rebalance
    from rebalancer.metrics import MetricsServer, RebalancerMetrics

    app = typer.Typer()
    app.command("rebalance")(rebalance)
    app.command("noop")(lambda: None)
    cmd = get_command(app).commands["rebalance"]
    c = pod_spec(one(render("base"), "Deployment", "copack-rebalancer"))["containers"][0]
    assert c["args"][0] == "rebalance"
    flags = {o for p in cmd.params for o in p.opts}
    assert {a for a in c["args"] if a.startswith("--")} <= flags
    port = int(c["args"][c["args"].index("--metrics-port") + 1])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": port}
    assert c["image"].startswith("ghcr.io/copack/extender:")  # the image holds rebalancer/
    server = MetricsServer(RebalancerMetrics(), lambda key: None, lambda: (True, {}),
                           "127.0.0.1", 0).start()
    try:
        import httpx

        for probe in ("readinessProbe", "livenessProbe"):
            path = c[probe]["httpGet"]["path"]
            assert httpx.get(f"http://127.0.0.1:{server.port}{path}").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{server.port}/metrics").status_code == 200
    finally:
        server.stop()
