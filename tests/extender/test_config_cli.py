"""Configuration file, flags, `copack extender serve` refusals, `copack explain`, and HTTPS."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from typer.testing import CliRunner

from copack.cli import app as copack_app
from extender.config import EXAMPLE_CONFIG, ConfigError, ExtenderConfig, load_config
from extender.serve import ExtenderService
from policies.config import PolicyConfig
from tests.fakes.kube_objects import copack_pod, extender_args, gpu_node, gpu_units

runner = CliRunner()


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "extender.yaml"
    p.write_text(text)
    return p


def test_example_config_is_valid_and_is_the_default(tmp_path) -> None:
    cfg = load_config(_write(tmp_path, EXAMPLE_CONFIG))
    default = ExtenderConfig()
    assert cfg.model_dump(exclude={"policy"}) == default.model_dump(exclude={"policy"})
    assert cfg.policy_config() == default.policy_config() == PolicyConfig()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("policy: {name: fastest}", "policy.policy: unknown 'fastest'"),
        ("policy: {overcommit: 9}", "policy.overcommit: 9.0 must be within 0..4"),
        ("policy: {max_pods_per_unit: many}", "policy.max_pods_per_unit"),
        ("listen: {prot: 1}", "listen.prot: unknown key"),
        ("listen: {port: 70000}", "listen.port"),
        ("telemetry: {statistic: mean}", "telemetry.statistic"),
        ("tls: {cert_file: /nope.pem}", "tls: cert_file and key_file must be given together"),
        ("kube: {watch_timeout_s: -1}", "kube.watch_timeout_s"),
        ("- just\n- a list", "top level must be a mapping"),
        ("policy: [unclosed", "not valid YAML"),
    ],
)
def test_invalid_config_names_key_and_reason(tmp_path, text, needle) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_flags_override_the_file(tmp_path) -> None:
    cfg = load_config(_write(tmp_path, "policy: {name: binpack, overcommit: 0.5}\n"))
    cfg = cfg.with_overrides({"policy.policy": "spread", "listen.port": 9999,
                              "policy.stale_after_s": None})
    pc = cfg.policy_config()
    assert (pc.policy, pc.overcommit, cfg.listen.port) == ("spread", 0.5, 9999)
    with pytest.raises(ConfigError, match=r"policy\.overcommit"):
        cfg.with_overrides({"policy.overcommit": -1.0})


def test_serve_refuses_a_bad_config_at_start(tmp_path) -> None:
    path = _write(tmp_path, "policy:\n  name: complementary\n  overcommit: 12\n")
    r = runner.invoke(copack_app, ["extender", "serve", "--config", str(path)])
    assert r.exit_code == 2
    assert "policy.overcommit: 12.0 must be within 0..4" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(copack_app, ["extender", "serve", "--policy", "nope"])
    assert r.exit_code == 2 and "policy.policy: unknown 'nope'" in r.output
    r = runner.invoke(copack_app, ["extender", "serve", "--kubeconfig",
                                   str(tmp_path / "missing-kubeconfig")])
    assert r.exit_code == 2 and "cannot reach the Kubernetes API" in r.output
    r = runner.invoke(copack_app, ["extender", "serve", "--print-example-config"])
    assert r.exit_code == 0 and yaml.safe_load(r.output)["policy"]["name"] == "complementary"


def _service(kube, tmp_path, **extra) -> ExtenderService:
    cfg = ExtenderConfig.model_validate({
        "listen": {"host": "127.0.0.1", "port": 0},
        "kube": {"kubeconfig": str(kube.kubeconfig)},
        "telemetry": {"enabled": False},
        **extra,
    })
    return ExtenderService(cfg).start()


def _wait_ready(client: httpx.Client) -> None:
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "not ready"
        time.sleep(0.02)


def test_explain_command_against_a_running_extender(fake_kube, tmp_path) -> None:
    s = fake_kube.server
    s.create("nodes", gpu_node("n0", gpu_units("n0", 1)))
    pod = s.add_pod(copack_pod("p", role="decode", demand="sm=0.2,bw=0.3,mem=10Gi"))
    svc = _service(fake_kube, tmp_path)
    try:
        with httpx.Client(base_url=svc.url) as c:
            _wait_ready(c)
            c.post("/filter", content=orjson.dumps(
                extender_args({"kind": "Pod", "apiVersion": "v1", **pod}, ["n0"])))
        r = runner.invoke(copack_app, ["explain", "default/p", "--url", svc.url])
        assert r.exit_code == 0, r.output
        out = orjson.loads(r.output)
        assert out["pod"] == "default/p"
        assert out["decision"]["chosen"]["unit"] == "GPU-n0-0"
        r = runner.invoke(copack_app, ["explain", "default/nobody", "--url", svc.url])
        assert r.exit_code == 1 and "no decision recorded for default/nobody" in r.output
        r = runner.invoke(copack_app, ["explain", "p", "--url", svc.url])  # default namespace
        assert r.exit_code == 0
    finally:
        svc.stop()
    r = runner.invoke(copack_app, ["explain", "default/p", "--url", svc.url, "--timeout", "1"])
    assert r.exit_code == 1 and "cannot reach the extender" in r.output


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a cert")
def test_https_as_kube_scheduler_enable_https_expects(fake_kube, tmp_path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    fake_kube.server.create("nodes", gpu_node("n0", gpu_units("n0", 1)))
    pod = fake_kube.server.add_pod(copack_pod("p", demand="sm=0.1,bw=0.1,mem=1Gi"))
    svc = _service(fake_kube, tmp_path, tls={"cert_file": str(cert), "key_file": str(key)})
    try:
        assert svc.url.startswith("https://")
        with httpx.Client(base_url=svc.url,
                          verify=ssl.create_default_context(cafile=str(cert))) as c:
            _wait_ready(c)
            r = c.post("/filter", content=orjson.dumps(
                extender_args({"kind": "Pod", "apiVersion": "v1", **pod}, ["n0"])))
            assert r.json()["NodeNames"] == ["n0"]
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on that port
            httpx.get(svc.url.replace("https://", "http://") + "/healthz", timeout=2)
        r = runner.invoke(copack_app, ["explain", "default/p", "--url", svc.url,
                                       "--cacert", str(cert)])
        assert r.exit_code == 0, r.output
    finally:
        svc.stop()
