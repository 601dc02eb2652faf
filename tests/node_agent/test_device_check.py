"""bench/device_check.py's whole path (sampler, phase labelling, medians, verdict, files) in its
--dry-run mode against the fake NVML; the real run needs a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_device_check_dry_run_tells_the_phases_apart(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "device_check.py"), "--dry-run", "--out",
         str(tmp_path), "--phase-seconds", "1.5", "--idle-seconds", "0.6", "--interval", "0.1",
         "--settle-seconds", "0.5"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "RESULT: PASS" in res.stdout
    (json_file,) = tmp_path.glob("device_check-dry-run-*.json")
    (md_file,) = tmp_path.glob("device_check-dry-run-*.md")
    data = json.loads(json_file.read_text())
    assert data["passed"] and data["unit"]["source"] == "gpm"
    mm, cp = data["summary"]["matmul"], data["summary"]["copy"]
    assert mm["tensor_active"] == pytest.approx(0.85)
    assert cp["dram_bw_active"] == pytest.approx(0.92)
    assert {r["phase"] for r in data["readings"]} >= {"idle", "matmul", "gap", "copy"}
    assert "| matmul |" in md_file.read_text()
