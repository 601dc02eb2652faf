"""Rendered manifests: schema-valid (kubernetes-validate, strict) and wired the way copack needs."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from copack.cli import app
from policies.annotations import pod_request_from_k8s
from workloads.manifests import RenderError, RenderSpec, render, slug, to_yaml
from workloads.roles import infer_role

K8S_VERSION = kubernetes_validate.latest_version()


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def deployment(objects: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    (d,) = [o for o in by_kind(objects, "Deployment") if o["metadata"]["name"].endswith(suffix)]
    return d


def as_pod(dep: dict[str, Any]) -> dict[str, Any]:
    """The pod a Deployment would create, as the API would serve it."""
    tpl = dep["spec"]["template"]
    meta = {**tpl["metadata"], "name": "p-0", "namespace": dep["metadata"]["namespace"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tpl["spec"]}


FULL = RenderSpec(
    model="meta-llama/Llama-3.1-8B-Instruct",
    prefill=2,
    decode=3,
    namespace="llm",
    load="rps=4,prompt=2048,output=128",
    slo="ttft=500ms,tpot=50ms",
    prefill_demand="sm=0.6,bw=0.2,mem=24Gi",
    decode_demand="sm=0.3,bw=0.5,mem=40Gi",
    max_model_len=8192,
)


@pytest.mark.parametrize(
    "spec",
    [
        FULL,
        RenderSpec(model="Qwen/Qwen2.5-7B-Instruct"),
        RenderSpec(model="m", prefill=0, decode=2, connector="example"),
    ],
)
def test_every_object_validates_strictly(spec: RenderSpec) -> None:
    objects = render(spec)
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # The YAML the command prints is the same objects.
    assert list(yaml.safe_load_all(to_yaml(objects))) == objects


def test_validation_is_strict_enough_to_catch_a_typo() -> None:
    dep = deployment(render(FULL), "-decode")
    dep["spec"]["template"]["spec"]["schedulerNmae"] = "copack-scheduler"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_servers_are_copack_scheduled_with_annotations_and_downward_env() -> None:
    objects = render(FULL)
    for role, replicas in (("prefill", 2), ("decode", 3)):
        dep = deployment(objects, f"-{role}")
        assert dep["spec"]["replicas"] == replicas
        pod = as_pod(dep)
        spec = pod["spec"]
        assert spec["schedulerName"] == "copack-scheduler"
        (c,) = spec["containers"]
        assert c["resources"]["limits"]["copack.io/gpu"] == "1"
        assert c["command"][:5] == ["copack", "workload", "serve", "--role", role]
        env = {e["name"]: e for e in c["env"]}
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "status.podIP"
        )
        assert "copack.io/sm-share" in env["COPACK_SM_SHARE"]["valueFrom"]["fieldRef"]["fieldPath"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/health"
        # The scheduler side reads what was rendered: role from the command line and the
        # annotation, model, load, SLO and demand from the annotations.
        assert infer_role(pod) == role
        req = pod_request_from_k8s(pod)
        assert req.role == role
        assert req.model == FULL.model
        assert req.load is not None and req.load.prompt_tokens == 2048
        assert req.slo.ttft_s == pytest.approx(0.5)
        assert req.demand is not None and req.demand.mem_bytes == (
            24 if role == "prefill" else 40
        ) * 1024**3


def test_proxy_finds_the_servers_by_label_and_is_exposed() -> None:
    objects = render(FULL)
    proxy = deployment(objects, "-proxy")
    cmd = proxy["spec"]["template"]["spec"]["containers"][0]["command"]
    sel = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    for role in ("prefill", "decode"):
        labels = deployment(objects, f"-{role}")["spec"]["template"]["metadata"]["labels"]
        wanted = dict(kv.split("=") for kv in sel[f"--{role}-selector"].split(","))
        assert wanted.items() <= labels.items()
    (svc,) = by_kind(objects, "Service")
    assert svc["spec"]["selector"] == proxy["spec"]["template"]["metadata"]["labels"]
    (role,) = by_kind(objects, "Role")
    assert role["rules"][0]["resources"] == ["pods"] and "list" in role["rules"][0]["verbs"]
    (binding,) = by_kind(objects, "RoleBinding")
    assert binding["subjects"][0]["name"] == proxy["spec"]["template"]["spec"][
        "serviceAccountName"
    ]


def test_without_prefill_the_servers_are_mixed() -> None:
    objects = render(RenderSpec(model="m", prefill=0, decode=2))
    names = [o["metadata"]["name"] for o in by_kind(objects, "Deployment")]
    assert names == ["m-mixed", "m-proxy"]
    pod = as_pod(deployment(objects, "-mixed"))
    assert infer_role(pod) == "mixed"
    assert "--connector" not in pod["spec"]["containers"][0]["command"]
    cmd = deployment(objects, "-proxy")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--prefill-selector" not in cmd


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (RenderSpec(model=""), "--model"),
        (RenderSpec(model="m", decode=0), "--decode"),
        (RenderSpec(model="m", name="Bad_Name"), "--name"),
        (RenderSpec(model="m", connector="p2p"), "--connector"),
        (RenderSpec(model="m", load="rps=fast"), "--load"),
        (RenderSpec(model="m", slo="ttft=500"), "--slo"),
        (RenderSpec(model="m", decode_demand="mem=lots"), "--decode-demand"),
    ],
)
def test_bad_options_are_refused(spec: RenderSpec, fragment: str) -> None:
    with pytest.raises(RenderError, match=fragment):
        render(spec)


def test_slug() -> None:
    assert slug("meta-llama/Llama-3.1-8B-Instruct") == "llama-3-1-8b-instruct"
    assert slug("/models/x/") == "x"
    assert slug("///") == "model"


def test_cli_render_yaml_and_json() -> None:
    runner = CliRunner()
    args = ["workload", "render", "--model", "org/M-7B", "--prefill", "1", "--decode", "2"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    docs = list(yaml.safe_load_all(out.stdout))
    assert [d["kind"] for d in docs] == [
        "Deployment", "Deployment", "ServiceAccount", "Role", "RoleBinding", "Deployment",
        "Service",
    ]  # fmt: skip
    assert "&id" not in out.stdout
    js = runner.invoke(app, [*args, "-o", "json"])
    assert json.loads(js.stdout)["items"] == docs
    bad = runner.invoke(app, [*args, "--load", "rps=x,prompt=1"])
    assert bad.exit_code == 2 and "error: --load" in bad.output


def test_servers_drain_before_sigterm_and_prefill_hands_over() -> None:
    """preStop waits for the server to go idle; prefill's grace covers a replacement's model
    load (the proxy's handover), decode's only what it holds. The proxy hands prefill over."""
    objects = render(FULL)
    pre, dec = deployment(objects, "-prefill"), deployment(objects, "-decode")
    for dep in (pre, dec):
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        cmd = c["lifecycle"]["preStop"]["exec"]["command"]
        assert cmd[:3] == ["copack", "workload", "wait-idle"] and "--idle" in cmd
        assert CliRunner().invoke(app, [*cmd[1:], "--help"]).exit_code == 0
    grace = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
             for d in (pre, dec)}
    assert grace[pre["metadata"]["name"]] >= 300 > grace[dec["metadata"]["name"]] > 0
    (proxy,) = deployment(objects, "-proxy")["spec"]["template"]["spec"]["containers"]
    assert "--no-handover" not in proxy["command"]
