"""Reads the Grafana dashboard: its queries, the metrics and labels they use."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tests.deploy.manifests import DEPLOY

DASHBOARD = DEPLOY / "overlays" / "prometheus" / "dashboards" / "copack.json"
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")
_FUNCTIONS = {"sum", "count", "max", "min", "avg", "rate", "irate", "increase",
              "histogram_quantile", "vector", "by", "on", "group_left", "group_right",
              "without", "or", "and", "unless", "label_values"}


@dataclass(frozen=True)
class Query:
    panel: str
    expr: str

    def metrics(self) -> set[str]:
        """Series names as exposed (with _total/_bucket...), from the expression."""
        names = set(re.findall(r"\b(copack_[a-zA-Z0-9_]+)\b", self.expr))
        return names - _FUNCTIONS

    def grouping_labels(self) -> set[str]:
        """Labels named in by(...), on(...), group_left(...) and {label=...} matchers."""
        out: set[str] = set()
        for group in re.findall(r"\b(?:by|on|group_left|group_right)\s*\(([^)]*)\)", self.expr):
            out |= {x.strip() for x in group.split(",") if x.strip()}
        for matchers in re.findall(r"\{([^}]*)\}", self.expr):
            out |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
        return out - {"le"}


def family(series: str) -> str:
    """The metric family a series belongs to (what prometheus_client names the metric)."""
    for s in _SUFFIXES:
        if series.endswith(s):
            return series.removesuffix(s)
    return series


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict[str, Any] | None = None) -> list[Query]:
    dash = dash or load()
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append(Query(p["title"], t["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append(Query(f"variable {var['name']}", var["query"]["query"]))
    return out
