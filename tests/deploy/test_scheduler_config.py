"""The copack-scheduler's KubeSchedulerConfiguration, as rendered into its ConfigMap, checked
field by field against the v1 types, and wired to the Deployment, the Service and the TLS
Secret it points at."""

from __future__ import annotations

import copy
from urllib.parse import urlparse

import pytest
import yaml

from policies.inventory import GPU_RESOURCE, SCHEDULER_NAME
from tests.deploy.manifests import NAMESPACE, OVERLAYS, find, one, pod_spec, render
from tests.deploy.scheduler_config import check


def scheduler_config(objs: list[dict]) -> dict:
    dep = one(objs, "Deployment", "copack-scheduler")
    spec = pod_spec(dep)
    (container,) = spec["containers"]
    (flag,) = [a for a in container["command"] if a.startswith("--config=")]
    path = flag.split("=", 1)[1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    directory, filename = path.rsplit("/", 1)
    volume = {v["name"]: v for v in spec["volumes"]}[mounts[directory]]
    cm = one(objs, "ConfigMap", volume["configMap"]["name"])
    return yaml.safe_load(cm["data"][filename])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_configuration_matches_the_v1_types(overlay: str) -> None:
    assert check(scheduler_config(render(overlay))) == []


def test_profile_extender_and_leader_election_are_what_copack_needs() -> None:
    objs = render("base")
    cfg = scheduler_config(objs)
    assert [p["schedulerName"] for p in cfg["profiles"]] == [SCHEDULER_NAME]
    (ext,) = cfg["extenders"]
    assert (ext["filterVerb"], ext["prioritizeVerb"], ext["bindVerb"]) == (
        "filter", "prioritize", "bind"
    )
    assert "preemptVerb" not in ext
    assert ext["weight"] > 0
    assert ext["nodeCacheCapable"] is True
    assert ext["managedResources"] == [{"name": GPU_RESOURCE, "ignoredByScheduler": False}]
    assert ext["enableHTTPS"] is True
    assert ext["httpTimeout"] == "5s"
    le = cfg["leaderElection"]
    assert le["leaderElect"] is True
    assert (le["resourceNamespace"], le["resourceName"]) == (NAMESPACE, SCHEDULER_NAME)
    # The Role granting get/update on exactly that lease.
    role = one(objs, "Role", "copack-scheduler-leader-election")
    assert role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                              "resourceNames": [le["resourceName"]], "verbs": ["get", "update"]}]


def test_extender_url_and_tls_point_at_the_service_and_its_ca() -> None:
    objs = render("base")
    (ext,) = scheduler_config(objs)["extenders"]
    url = urlparse(ext["urlPrefix"])
    svc = one(objs, "Service", "copack-extender")
    assert url.scheme == "https"
    assert url.hostname == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert url.port in [p["port"] for p in svc["spec"]["ports"]]
    tls = ext["tlsConfig"]
    assert not tls.get("insecure")
    # The CA must be given, or kube-scheduler skips verification altogether.
    assert tls.get("caFile") or tls.get("caData")
    assert tls["serverName"] == url.hostname
    spec = pod_spec(one(objs, "Deployment", "copack-scheduler"))
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    directory, filename = tls["caFile"].rsplit("/", 1)
    volume = {v["name"]: v for v in spec["volumes"]}[mounts[directory]]
    assert volume["secret"]["secretName"] == "copack-extender-tls"
    assert {"key": "ca.crt", "path": filename} in volume["secret"]["items"]
    # ... and the extender serves that Secret's certificate.
    ext_spec = pod_spec(one(objs, "Deployment", "copack-extender"))
    assert [v["secret"]["secretName"] for v in ext_spec["volumes"] if "secret" in v] == [
        "copack-extender-tls"
    ]


def test_scheduler_image_is_upstream_kube_scheduler() -> None:
    for overlay in OVERLAYS:
        (c,) = pod_spec(one(render(overlay), "Deployment", "copack-scheduler"))["containers"]
        assert c["image"].startswith("registry.k8s.io/kube-scheduler:v1.")
        assert find(render(overlay), "ClusterRoleBinding", "copack-scheduler-as-kube-scheduler")


def _base_config() -> dict:
    return copy.deepcopy(scheduler_config(render("base")))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["extenders"][0].update(nodeCacheCapabel=True),
         "extenders[0].nodeCacheCapabel: unknown field"),
        (lambda c: c["extenders"][0].update(weight="10"), "extenders[0].weight: '10' is not"),
        (lambda c: c["extenders"][0].update(weight=0), "weight: must be > 0"),
        (lambda c: c["extenders"][0].update(httpTimeout="5 seconds"), "httpTimeout"),
        (lambda c: c["extenders"][0]["tlsConfig"].update(caFile=None), "tlsConfig.caFile"),
        (lambda c: c["extenders"][0]["tlsConfig"].update(caData="not base64!"), "caData"),
        (lambda c: c["extenders"][0]["managedResources"][0].update(ignoredByScheduler="no"),
         "ignoredByScheduler"),
        (lambda c: c["extenders"][0].pop("urlPrefix"), "extenders[0].urlPrefix: required"),
        (lambda c: c["extenders"].append(dict(c["extenders"][0])), "only one may bind"),
        (lambda c: c["profiles"].append({"schedulerName": SCHEDULER_NAME}), "duplicate"),
        (lambda c: c["profiles"][0]["plugins"]["score"].update(disable=[]), "score.disable"),
        (lambda c: c["leaderElection"].update(leaseDuration=15), "leaseDuration"),
        (lambda c: c.update(apiVersion="kubescheduler.config.k8s.io/v1beta3"), "apiVersion"),
        (lambda c: c.update(extender=[]), "extender: unknown field"),
        (lambda c: c["extenders"][0].update(enableHTTPS=False), "does not start with http://"),
    ],
)
def test_the_check_names_each_kind_of_mistake(mutate, expected: str) -> None:
    cfg = _base_config()
    mutate(cfg)
    errors = check(cfg)
    assert any(expected in e for e in errors), errors


def test_non_mapping_is_reported() -> None:
    assert check(["not", "a", "mapping"]) == ["<root>: must be a mapping, got list"]
