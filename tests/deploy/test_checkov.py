"""checkov, a policy scanner nobody here wrote, passes on every rendered manifest and on both
Dockerfiles. Each check we skip is skipped in the manifest itself (a `checkov.io/skipN`
annotation or a `# checkov:skip=` comment) with its reason written there; a skip that no longer
matches a check checkov runs is stale and fails too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.checkov_runner import (
    INSTALL_HINT,
    CheckovReport,
    checkov_binary,
    for_files,
    run_checkov,
)
from tests.deploy.manifests import DEPLOY, OVERLAYS, render

MIN_REASON = 40  # characters: a reason, not a shrug
DOCKERFILES = sorted((DEPLOY / "images").glob("*.Dockerfile"))


@pytest.fixture(scope="module")
def checkov() -> Path:
    binary = checkov_binary()
    if binary is None:
        pytest.fail(f"checkov is not installed: {INSTALL_HINT}")
    return binary


WEAKENED = "weakened-extender.yaml"


def _weakened_extender() -> dict:
    """The extender with its hardening removed: checkov must flag it (the scanner is live)."""
    (ext,) = [o for o in render("base") if o["kind"] == "Deployment"
              and o["metadata"]["name"] == "copack-extender"]
    c = ext["spec"]["template"]["spec"]["containers"][0]
    c["securityContext"] = {"privileged": True}
    del c["resources"]
    return ext


@pytest.fixture(scope="module")
def report(checkov: Path, tmp_path_factory: pytest.TempPathFactory) -> CheckovReport:
    out = tmp_path_factory.mktemp("rendered")
    files = []
    for overlay in OVERLAYS:
        f = out / (overlay.replace("/", "-") + ".yaml")
        f.write_text(yaml.safe_dump_all(render(overlay), sort_keys=False))
        files.append(f)
    (out / WEAKENED).write_text(yaml.safe_dump(_weakened_extender()))
    return run_checkov(checkov, ["kubernetes", "dockerfile"],
                       [*files, out / WEAKENED, *DOCKERFILES])


@pytest.fixture(scope="module")
def k8s_report(report: CheckovReport) -> CheckovReport:
    return for_files(report, {o.replace("/", "-") + ".yaml" for o in OVERLAYS})


def _describe(checks: list[dict]) -> str:
    return "\n".join(
        f"{c['check_id']} {c['resource']} ({Path(c['file_path']).name}): {c['check_name']}"
        for c in checks
    )


def test_checkov_passes_on_every_rendered_manifest(k8s_report: CheckovReport) -> None:
    assert not k8s_report.parsing_errors
    assert not k8s_report.failed, _describe(k8s_report.failed)
    # It really ran: the workload checks alone are dozens per workload.
    assert len(k8s_report.passed) > 300


def test_every_skip_carries_a_reason(k8s_report: CheckovReport) -> None:
    assert k8s_report.skipped  # the agent's root uid, at least
    for c in k8s_report.skipped:
        reason = c["check_result"].get("suppress_comment", "").strip()
        assert len(reason) >= MIN_REASON, f"{c['check_id']} on {c['resource']}: {reason!r}"


def _annotated_skips() -> set[tuple[str, str, str]]:
    """(overlay file stem, check id, resource) for every checkov.io/skipN annotation."""
    out = set()
    for overlay in OVERLAYS:
        for obj in render(overlay):
            meta = obj["metadata"]
            for k, v in (meta.get("annotations") or {}).items():
                if re.fullmatch(r"checkov\.io/skip\d+", k):
                    check_id, sep, reason = v.partition("=")
                    assert sep and reason.strip(), f"{k} on {meta['name']}: no reason: {v!r}"
                    ns = meta.get("namespace", "default")
                    out.add((overlay.replace("/", "-"), check_id,
                             f"{obj['kind']}.{ns}.{meta['name']}"))
    return out


def test_no_stale_skip_annotation(k8s_report: CheckovReport) -> None:
    used = {(Path(c["file_path"]).stem, c["check_id"], c["resource"]) for c in k8s_report.skipped}
    stale = _annotated_skips() - used
    assert not stale, f"skip annotations for checks checkov does not flag: {sorted(stale)}"


def test_checkov_passes_on_the_dockerfiles(report: CheckovReport) -> None:
    assert len(DOCKERFILES) == 2
    docker = for_files(report, {d.name for d in DOCKERFILES})
    assert not docker.parsing_errors
    assert not docker.failed, _describe(docker.failed)
    assert len(docker.passed) > 20
    for c in docker.skipped:
        reason = c["check_result"].get("suppress_comment", "").strip()
        assert len(reason) >= MIN_REASON, f"{c['check_id']} {c['file_path']}: {reason!r}"


def test_checkov_does_flag_what_the_manifests_avoid(report: CheckovReport) -> None:
    failed = {x["check_id"] for x in for_files(report, {WEAKENED}).failed}
    assert {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_13"} <= failed, failed
