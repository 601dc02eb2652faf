"""The Grafana dashboard is well-formed and queries only metrics the code exports (by name
here; test_deployment_e2e.py scrapes the running agent and extender for names and labels)."""

from __future__ import annotations

import re

from tests.deploy.dashboard import DASHBOARD, family, load, queries
from tests.deploy.manifests import REPO, one, render


def _code_strings() -> str:
    return "\n".join(p.read_text() for d in ("extender", "node_agent")
                     for p in (REPO / d).rglob("*.py") if not p.name.endswith("_pb2.py"))


def test_dashboard_is_valid_grafana_json_with_unique_ids_and_no_overlaps() -> None:
    dash = load()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert t["expr"].count("(") == t["expr"].count(")"), p["title"]


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    used = {m for q in queries() for m in q.metrics()}
    assert {"copack_gpu_sm_active_ratio", "copack_gpu_dram_bw_active_ratio",
            "copack_gpu_unit_pod_info"} <= used  # per-GPU activity, pods per unit
    assert {"copack_extender_request_duration_seconds_bucket",
            "copack_extender_decisions_total"} <= used  # extender latency and decisions


def test_every_queried_metric_is_exported_by_the_code() -> None:
    code = _code_strings()
    missing = sorted({family(m) for q in queries() for m in q.metrics()}
                     - set(re.findall(r"\"(copack_[a-z0-9_]+)\"", code)))
    assert not missing, f"dashboard queries metrics no code exports: {missing}"


def test_node_variable_filters_the_agent_panels() -> None:
    for q in queries():
        if any(m.startswith("copack_gpu_") for m in q.metrics()) and "variable" not in q.panel:
            assert 'node=~"$node"' in q.expr, q.panel


def test_dashboard_configmap_carries_the_file_and_the_sidecar_label() -> None:
    cm = one(render("overlays/prometheus"), "ConfigMap", "copack-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["copack.json"] == DASHBOARD.read_text()
