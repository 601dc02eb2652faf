"""The rebalancer's HTTP face and its command line, for real: /metrics, /healthz and /explain
over loopback; `copack rebalance --once` and `copack explain --rebalancer-url` through the
`copack` app against the fake API server (and a real extender); bad input gives one clear
line, no traceback."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from copack.cli import app
from extender.config import ExtenderConfig
from extender.serve import ExtenderService
from tests.fakes.kube_fixtures import FakeKube
from tests.rebalancer.conftest import add_node, add_running_pod, eventually, evictions, settled

runner = CliRunner()


def _cluster(kube: FakeKube) -> None:
    add_node(kube, "n1", gpus=2)
    add_running_pod(kube, "a", "n1", 0, workload="rs-a")
    add_running_pod(kube, "b", "n1", 1, workload="rs-b")


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in\n{text}"
    return float(m.group(1))


def test_metrics_healthz_and_explain_over_http(fake_kube: FakeKube, start_rebalancer) -> None:
    _cluster(fake_kube)
    svc = start_rebalancer(metrics=True)
    eventually(lambda: settled(svc, 2), what="two pods placed")
    report = svc.controller.round()
    (move,) = report["moves"]
    eventually(lambda: settled(svc, 1), what="the evicted pod to leave the view")
    svc.controller.reconcile()
    with httpx.Client(base_url=svc.url, timeout=5) as http:
        text = http.get("/metrics").text
        assert _metric(text, 'copack_rebalancer_evictions_total{outcome="evicted"}') == 1
        assert _metric(text, 'copack_rebalancer_evictions_total{outcome="refused"}') == 0
        assert _metric(text, "copack_rebalancer_rounds_total") == 1
        assert _metric(text, "copack_rebalancer_gpus_freed_total") == 1
        left = f'copack_rebalancer_budget_left{{workload="{move["workload"]}"}}'
        assert _metric(text, left) == 0  # its one eviction of the minute is spent
        h = http.get("/healthz")
        assert h.status_code == 200 and h.json()["synced"] is True
        ex = http.get(f"/explain/{move['pod']}")
        assert ex.status_code == 200
        assert ex.json()["action"] == "evicted" and "empties GPU" in ex.json()["reason"]
        missing = http.get("/explain/default/nobody")
        assert missing.status_code == 404 and "nobody" in missing.json()["Error"]


@pytest.fixture
def extender(fake_kube: FakeKube) -> Iterator[ExtenderService]:
    cfg = ExtenderConfig.model_validate({
        "listen": {"host": "127.0.0.1", "port": 0},
        "kube": {"kubeconfig": str(fake_kube.kubeconfig)},
        "telemetry": {"enabled": False},
    })
    svc = ExtenderService(cfg).start()
    try:
        yield svc
    finally:
        svc.stop()


def test_copack_explain_shows_the_eviction_reason(
    fake_kube: FakeKube, start_rebalancer, extender: ExtenderService
) -> None:
    _cluster(fake_kube)
    svc = start_rebalancer(metrics=True)
    eventually(lambda: settled(svc, 2), what="two pods placed")
    (move,) = svc.controller.round()["moves"]
    res = runner.invoke(app, ["explain", move["pod"], "--url", extender.url,
                              "--rebalancer-url", svc.url])
    assert res.exit_code == 0, res.output
    body, _, tail = res.stdout.rpartition("}\n")
    out = orjson.loads(body + "}")
    assert out["rebalancer"]["action"] == "evicted"
    assert "extender" in out  # the extender's decision (or why it has none) beside it
    assert tail.startswith(f"copack-rebalancer evicted {move['pod']}: copack-rebalancer empties")
    # a pod the rebalancer never touched: the extender's answer, the rebalancer's 404 beside it
    res = runner.invoke(app, ["explain", "default/nobody", "--url", extender.url,
                              "--rebalancer-url", "http://127.0.0.1:9"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "cannot reach the rebalancer" in res.output


def test_rebalance_once_evicts_and_prints_the_round(fake_kube: FakeKube) -> None:
    _cluster(fake_kube)
    res = runner.invoke(app, ["rebalance", "--once", "--kubeconfig", str(fake_kube.kubeconfig),
                              "--no-telemetry", "--min-age-s", "60", "--log-level", "warning"])
    assert res.exit_code == 0, res.output
    report = orjson.loads(res.stdout)
    (move,) = report["moves"]
    assert move["action"] == "evicted" and evictions(fake_kube) == [move["pod"]]


def test_rebalance_once_dry_run_evicts_nothing(fake_kube: FakeKube) -> None:
    _cluster(fake_kube)
    res = runner.invoke(app, ["rebalance", "--once", "--dry-run", "--kubeconfig",
                              str(fake_kube.kubeconfig), "--no-telemetry", "--min-age-s", "60",
                              "--log-level", "warning"])
    assert res.exit_code == 0, res.output
    assert orjson.loads(res.stdout)["moves"][0]["action"] == "dry_run"
    assert evictions(fake_kube) == [] and len(fake_kube.server.list("pods")) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--interval-s", "0"], "interval_s must be positive"),
    (["--evictions-per-minute", "-1"], "evictions_per_minute must be >= 0"),
    (["--metrics-port", "70000"], "--metrics-port: 70000 is not a port"),
    (["--settle-timeout-s", "0"], "settle_timeout_s must be positive"),
    (["--log-level", "loud"], "--log-level: 'loud'"),
    (["--config", "/nonexistent/extender.yaml"], "cannot read"),
    (["--kubeconfig", "/nonexistent/kubeconfig"], "cannot reach the Kubernetes API"),
    (["--interval-s", "soon"], "Invalid value"),
])
def test_bad_input_is_one_clear_error(args: list[str], message: str) -> None:
    res = runner.invoke(app, ["rebalance", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_once_without_an_api_server_says_so(fake_kube: FakeKube) -> None:
    kubeconfig = fake_kube.kubeconfig
    fake_kube.server.stop()
    res = runner.invoke(app, ["rebalance", "--once", "--kubeconfig", str(kubeconfig),
                              "--no-telemetry", "--sync-timeout-s", "1", "--log-level",
                              "warning"])
    assert res.exit_code == 1, res.output
    assert "did not sync within 1 s" in res.output and "Traceback" not in res.output
