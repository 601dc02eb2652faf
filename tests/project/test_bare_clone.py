"""The project as a new user meets it: a clone with nothing beside it (no `../shared/`), the
README's demo command, and the data inside the package a wheel installs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = (
    "workloads/data/azure_llm_2023_code.csv",
    "workloads/data/azure_llm_2023_conv.csv",
    "workloads/data/muxserve_llama_a100_profile.json",
    "sim/scenarios/default.yaml",
)


def _tree_files() -> list[str]:
    """What a clone holds: tracked files plus new ones not ignored (so an uncommitted change
    is tested too); CI's checkout is clean, where the two are the same."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def _copy_tree(dest: Path) -> None:
    for rel in _tree_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COPACK_", "VIRTUAL_ENV"))}
    env.pop("PYTHONPATH", None)
    return env


def test_no_python_file_reads_a_folder_beside_the_checkout() -> None:
    pattern = re.compile(r"""\.\./shared|["']shared["']\s*/\s*["']data|parent\s*/\s*["']shared""")
    hits = [
        f"{rel}:{n}"
        for rel in _tree_files()
        if rel.endswith(".py") and rel != "tests/project/test_bare_clone.py"
        for n, line in enumerate((ROOT / rel).read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


@pytest.mark.slow
def test_readme_demo_command_runs_in_a_bare_copy(tmp_path: Path) -> None:
    clone = tmp_path / "copack"
    _copy_tree(clone)
    assert not (tmp_path / "shared").exists()
    python = getattr(sys, "_base_executable", sys.executable)
    args = "--duration-s 180 --policy dedicated --policy complementary --workers 1"
    res = subprocess.run(
        ["make", "demo", f"PYTHON={python}", f"DEMO_ARGS={args}"],
        cwd=clone, env=_clean_env(), capture_output=True, text=True, timeout=900,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    for word in ("dedicated", "complementary", "fluid lower bound", "GPU-h", "SLO met"):
        assert word in out
    assert "TraceError" not in out and "Traceback" not in out
    assert (clone / "out" / "default-report.html").is_file()


@pytest.mark.slow
def test_the_wheel_carries_the_data(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy_tree(src)
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
        env=_clean_env(), capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = tmp_path.glob("copack-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in BUNDLED if f not in names]
    assert missing == []
