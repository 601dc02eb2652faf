"""The kustomizations render with the real kustomize, and what they render hangs together:
names are unique, every namespaced object is in copack-system (or deliberately in kube-system),
every reference (ServiceAccount, ConfigMap, Secret, Service selector, named port, NetworkPolicy
selector, RBAC subject) points at something that exists, and the security settings the issue
asks for are on every container."""

from __future__ import annotations

import re

import pytest

from tests.deploy.manifests import (
    CLUSTER_SCOPED,
    NAMESPACE,
    OVERLAYS,
    RenderError,
    find,
    key,
    one,
    pod_spec,
    render,
    render_text,
    workloads,
)

# Secrets the manifests consume but do not create: the operator supplies the extender's TLS
# Secret (cert-manager or their PKI, docs/install.md) except in the dev overlay, whose Job makes it.
EXTERNAL_SECRETS = {"copack-extender-tls"}
TLS_SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}


@pytest.fixture(params=OVERLAYS)
def objs(request: pytest.FixtureRequest) -> list[dict]:
    return render(request.param)


def test_every_overlay_renders_something() -> None:
    for overlay in OVERLAYS:
        kinds = {o["kind"] for o in render(overlay)}
        assert {"Namespace", "Deployment", "DaemonSet", "Service", "NetworkPolicy"} <= kinds


def test_a_broken_kustomization_is_reported_with_kustomizes_message(tmp_path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(RenderError, match=r"missing\.yaml"):
        render_text(tmp_path)


def test_names_are_unique_and_namespaced_objects_live_in_copack_system(objs) -> None:
    keys = [key(o) for o in objs]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    for o in objs:
        ns = o["metadata"].get("namespace")
        if o["kind"] in CLUSTER_SCOPED:
            assert ns is None, key(o)
        elif o["kind"] == "RoleBinding" and ns == "kube-system":
            # Only the scheduler's read access to extension-apiserver-authentication.
            assert o["roleRef"]["name"] == "extension-apiserver-authentication-reader"
        else:
            assert ns == NAMESPACE, key(o)


def test_every_object_is_labelled_part_of_copack(objs) -> None:
    for o in objs:
        assert o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "copack", key(o)


def test_containers_are_locked_down(objs) -> None:
    for w in workloads(objs):
        spec = pod_spec(w)
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", key(w)
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            where = f"{key(w)} container {c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert not sc.get("privileged"), where
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(
                res["limits"]
            ), where
            if w["metadata"]["name"] != "copack-agent":
                # Only the agent runs as root (device-plugin socket dir, see agent.yaml).
                assert spec["securityContext"]["runAsNonRoot"] is True, where
                assert sc["runAsNonRoot"] is True, where
                assert spec["securityContext"]["runAsUser"] >= 10000, where


def test_images_are_pinned(objs) -> None:
    for w in workloads(objs):
        for c in pod_spec(w)["containers"]:
            image = c["image"]
            m = re.fullmatch(
                r"(?P<repo>[^@:]+(?::\d+)?[^@:]*):(?P<tag>[\w.-]+)(@sha256:[0-9a-f]{64})?", image
            )
            assert m, f"{key(w)}: image {image!r} has no tag"
            assert m["tag"] != "latest", f"{key(w)}: {image}"
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", m["tag"]), f"{key(w)}: {image} not a release"


def test_references_resolve(objs) -> None:
    by_kind: dict[str, set[str]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], set()).add(o["metadata"]["name"])
    secrets = by_kind.get("Secret", set()) | EXTERNAL_SECRETS
    for w in workloads(objs):
        spec = pod_spec(w)
        assert spec["serviceAccountName"] in by_kind["ServiceAccount"], key(w)
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in by_kind["ConfigMap"], (key(w), v)
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, (key(w), v)
                for item in v["secret"].get("items", []):
                    assert item["key"] in TLS_SECRET_KEYS, (key(w), item)
        mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert mounts == {v["name"] for v in spec.get("volumes", [])}, key(w)
    for b in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding"):
        for s in b["subjects"]:
            assert s["kind"] == "ServiceAccount" and s["namespace"] == NAMESPACE, key(b)
            assert s["name"] in by_kind["ServiceAccount"], key(b)
        ref = b["roleRef"]
        if not ref["name"].startswith(("system:", "extension-apiserver-")):
            assert ref["name"] in by_kind[ref["kind"]], key(b)


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # all we use
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _pods_by_name(objs) -> dict[str, dict]:
    return {w["metadata"]["name"]: w for w in workloads(objs)}


def test_services_select_their_pods_and_named_ports_exist(objs) -> None:
    from extender.role_label import ROLE_LABEL

    pods = _pods_by_name(objs)
    for svc in find(objs, "Service"):
        # the extender's role label is put on its pods at run time, by the leader itself
        selector = {k: v for k, v in svc["spec"]["selector"].items() if k != ROLE_LABEL}
        selected = [
            w for w in pods.values() if _matches({"matchLabels": selector},
                                                 w["spec"]["template"]["metadata"]["labels"])
        ]
        for w in selected:
            assert ROLE_LABEL not in w["spec"]["template"]["metadata"]["labels"], key(w)
        assert [w["metadata"]["name"] for w in selected] == [svc["metadata"]["name"]]
        ports = {p["name"] for c in pod_spec(selected[0])["containers"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, (key(svc), p)
    for w in pods.values():
        template_labels = w["spec"]["template"]["metadata"]["labels"]
        if "selector" in w["spec"]:
            assert _matches(w["spec"]["selector"], template_labels), key(w)
        for c in pod_spec(w)["containers"]:
            names = {p["name"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe"):
                if probe in c:
                    port = (c[probe].get("httpGet") or c[probe].get("tcpSocket"))["port"]
                    assert port in names, (key(w), probe, port)


def test_network_policies_admit_only_the_intended_peers(objs) -> None:
    pods = _pods_by_name(objs)
    agent = one(objs, "NetworkPolicy", "copack-agent")
    assert _matches(agent["spec"]["podSelector"],
                    pods["copack-agent"]["spec"]["template"]["metadata"]["labels"])
    rules = {r["ports"][0]["port"]: r["from"] for r in agent["spec"]["ingress"]}
    assert set(rules) == {"grpc", "metrics"}
    # gRPC telemetry: the extender's pods, nothing else.
    (grpc_peer,) = rules["grpc"]
    assert set(grpc_peer) == {"podSelector"}
    allowed = [n for n, w in pods.items()
               if _matches(grpc_peer["podSelector"], w["spec"]["template"]["metadata"]["labels"])]
    assert allowed == ["copack-extender"]
    # Metrics: Prometheus pods in the monitoring namespace (both selectors in one peer = AND).
    (metrics_peer,) = rules["metrics"]
    assert set(metrics_peer) == {"podSelector", "namespaceSelector"}
    ports = {p["name"]: p["containerPort"] for p in
             pod_spec(pods["copack-agent"])["containers"][0]["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9400}
    ext = one(objs, "NetworkPolicy", "copack-extender")
    (rule,) = ext["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["https"]
    from_pods = [p for p in rule["from"] if set(p) == {"podSelector"}]
    assert [n for n, w in pods.items() if any(
        _matches(p["podSelector"], w["spec"]["template"]["metadata"]["labels"]) for p in from_pods
    )] == ["copack-scheduler"]


def test_extender_deployment_is_highly_available_in_base_and_single_in_dev() -> None:
    base = render("base")
    ext = one(base, "Deployment", "copack-extender")
    assert ext["spec"]["replicas"] == 2
    assert one(base, "PodDisruptionBudget", "copack-extender")["spec"] == {
        "minAvailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": {"matchLabels": {"app.kubernetes.io/name": "copack-extender"}},
    }
    c = pod_spec(ext)["containers"][0]
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    dev = render("overlays/dev")
    assert one(dev, "Deployment", "copack-extender")["spec"]["replicas"] == 1
    assert one(dev, "PodDisruptionBudget", "copack-extender")["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in one(dev, "PodDisruptionBudget", "copack-extender")["spec"]
    assert find(dev, "Job", "copack-tls-bootstrap")


def test_agent_daemonset_touches_only_the_kubelet_sockets_on_gpu_nodes() -> None:
    ds = one(render("base"), "DaemonSet", "copack-agent")
    spec = pod_spec(ds)
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {"/var/lib/kubelet/device-plugins", "/var/lib/kubelet/pod-resources"}
    (c,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/var/lib/kubelet/pod-resources"]["readOnly"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_scheduler_mounts_only_the_ca_of_the_extender_secret() -> None:
    dep = one(render("base"), "Deployment", "copack-scheduler")
    (vol,) = [v for v in pod_spec(dep)["volumes"] if "secret" in v]
    assert vol["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def test_rebalancer_is_one_replica_reachable_only_as_intended(objs) -> None:
    """One controller (two would spend one budget twice); its metrics from Prometheus only;
    the agents' gRPC opened to it by its own policy and to nothing else."""
    pods = _pods_by_name(objs)
    dep = pods["copack-rebalancer"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    own = one(objs, "NetworkPolicy", "copack-rebalancer")
    (rule,) = own["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["metrics"]
    assert all(set(p) == {"podSelector", "namespaceSelector"} for p in rule["from"])
    extra = one(objs, "NetworkPolicy", "copack-agent-from-rebalancer")
    assert _matches(extra["spec"]["podSelector"],
                    pods["copack-agent"]["spec"]["template"]["metadata"]["labels"])
    (rule,) = extra["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["grpc"]
    (peer,) = rule["from"]
    assert [n for n, w in pods.items()
            if _matches(peer["podSelector"], w["spec"]["template"]["metadata"]["labels"])] == [
        "copack-rebalancer"]
