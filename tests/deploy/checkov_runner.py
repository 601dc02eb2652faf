"""Runs checkov (from its own virtualenv, see scripts/install-deploy-tools.sh) offline and
returns its JSON results per framework."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.deploy.manifests import REPO

INSTALL_HINT = "run scripts/install-deploy-tools.sh (make test does) or set COPACK_CHECKOV"


def checkov_binary() -> Path | None:
    configured = os.environ.get("COPACK_CHECKOV")
    path = Path(configured) if configured else REPO / ".venv-checkov" / "bin" / "checkov"
    return path if path.is_file() and os.access(path, os.X_OK) else None


@dataclass
class CheckovReport:
    passed: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    parsing_errors: list[str]


def run_checkov(binary: Path, frameworks: list[str], files: list[Path]) -> CheckovReport:
    """One checkov process for all files (it takes seconds to start); results of every
    framework together, each check carrying its `file_path`."""
    args = [str(binary), "--framework", *frameworks, "--skip-download", "--output", "json",
            "--no-fail-on-crash"]
    for f in files:
        args += ["--file", str(f)]
    # --skip-download and BC_SKIP_MAPPING keep checkov from calling its vendor's API.
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    if done.returncode not in (0, 1):  # 1: some check failed; anything else: it broke
        raise RuntimeError(f"checkov exited {done.returncode}: {done.stderr[-2000:]}")
    try:
        data = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(
            f"checkov printed no JSON: {done.stdout[-500:]} {done.stderr[-1500:]}"
        ) from None
    reports = data if isinstance(data, list) else [data]
    out = CheckovReport([], [], [], [])
    assert {r.get("check_type") for r in reports if "results" in r} <= set(frameworks)
    for r in reports:
        if "results" not in r:  # "no resources found" summary
            continue
        res = r["results"]
        out.passed += res.get("passed_checks", [])
        out.failed += res.get("failed_checks", [])
        out.skipped += res.get("skipped_checks", [])
        out.parsing_errors += res.get("parsing_errors", [])
    return out


def for_files(report: CheckovReport, names: set[str]) -> CheckovReport:
    """The part of a report about the files with these base names."""

    def keep(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [c for c in checks if Path(c["file_path"]).name in names]

    return CheckovReport(keep(report.passed), keep(report.failed), keep(report.skipped),
                         [e for e in report.parsing_errors if Path(e).name in names])
