"""docs/install.md says what the manifests and the code do: its YAML parses, its Pod example
validates strictly and opts in the way the extender expects, the paths, names, ports and
command flags it mentions exist."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml
from typer.main import get_command

from policies.inventory import GPU_RESOURCE, SCHEDULER_NAME
from tests.deploy.manifests import REPO, one, pod_spec, render
from tests.deploy.test_validate import VERSIONS

DOC = REPO / "docs" / "install.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


def test_every_yaml_block_parses() -> None:
    blocks = _blocks("yaml")
    assert len(blocks) >= 2
    for b in blocks:
        assert [d for d in yaml.safe_load_all(b) if d]


def test_pod_example_validates_and_opts_in() -> None:
    (pod,) = [d for b in _blocks("yaml") for d in yaml.safe_load_all(b)
              if d and d.get("kind") == "Pod"]
    for v in VERSIONS:
        kubernetes_validate.validate(pod, v, strict=True)
    assert pod["spec"]["schedulerName"] == SCHEDULER_NAME
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {GPU_RESOURCE: 1}
    from policies.annotations import pod_request_from_k8s, requests_gpu  # the extender's parser

    assert requests_gpu(pod)
    req = pod_request_from_k8s(pod)  # raises on an annotation it cannot use
    assert req.role == pod["metadata"]["annotations"]["copack.io/role"]


def test_paths_it_names_exist() -> None:
    text = DOC.read_text()
    paths = set(re.findall(
        r"\b((?:deploy/(?:base|overlays|images)|docs|tests/deploy)[\w./-]*\w)", text))
    assert "deploy/overlays/dev" in paths
    for p in paths:
        assert (REPO / p).exists(), p


def test_names_and_ports_match_the_manifests() -> None:
    text = DOC.read_text()
    objs = render("base")
    ports = {p["name"]: p["containerPort"] for p in
             pod_spec(one(objs, "DaemonSet", "copack-agent"))["containers"][0]["ports"]}
    assert f"gRPC on **{ports['grpc']}**" in text and f"metrics on **{ports['metrics']}**" in text
    svc = one(objs, "Service", "copack-extender")
    assert f"HTTPS on **{svc['spec']['ports'][0]['port']}**" in text
    image = pod_spec(one(objs, "Deployment", "copack-scheduler"))["containers"][0]["image"]
    assert f"kube-scheduler:{image.split(':')[1]}" in text
    for name in ("copack-extender-tls", "copack-system", "copack-tls-bootstrap",
                 "copack-grafana-dashboard"):
        assert name in text


@pytest.mark.parametrize(("group", "command"), [("workload", "render")])
def test_command_flags_it_uses_exist(group: str, command: str) -> None:
    from copack.cli import app

    cmd = get_command(app).commands[group].commands[command]
    known = {o for p in cmd.params for o in p.opts}
    used = set()
    for line in DOC.read_text().replace("\\\n", " ").splitlines():
        if f"copack {group} {command}" in line:
            used |= set(re.findall(r"(?<=\s)(--[a-z][a-z-]*)", line))
    assert used, f"the doc never runs copack {group} {command}"
    assert used <= known, used - known
