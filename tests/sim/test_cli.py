"""`copack sim --config FILE` end to end, and its answers to bad input."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from copack.cli import app
from tests.sim.conftest import small_raw

runner = CliRunner()


def test_sim_command_writes_the_table_and_a_self_contained_report(tmp_path: Path):
    raw = small_raw(duration_s=120, policies=["dedicated", "complementary"])
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    res = runner.invoke(app, ["sim", "--config", str(cfg), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    for word in ("dedicated", "complementary", "fluid lower bound", "GPU-h", "SLO met",
                 "over-provisioning", "start/drain", "fragmentation"):
        assert word in res.output
    report = out / "small-report.html"
    assert f"report: {report}" in res.output.replace("\n", "")
    html = report.read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "<table>" in html and "complementary" in html


def test_sim_command_runs_policies_in_parallel_processes(tmp_path: Path):
    raw = small_raw(duration_s=60, policies=["spread", "binpack"])
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    res = runner.invoke(
        app, ["sim", "-c", str(cfg), "--out", str(tmp_path), "--workers", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "spread" in res.output and "binpack" in res.output


def test_bad_scenario_is_a_clear_error_not_a_traceback(tmp_path: Path):
    raw = small_raw()
    raw["services"][0]["slo"] = {"ttft_s": -1, "tpot_s": 0.05}
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["sim", "--config", str(cfg)])
    assert res.exit_code == 2
    assert "services.0.slo.ttft_s" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["sim", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "cannot read scenario" in res.output


def test_unknown_policy_flag_is_refused(tmp_path: Path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(small_raw(duration_s=30)))
    res = runner.invoke(app, ["sim", "-c", str(cfg), "--policy", "fastest"])
    assert res.exit_code != 0 and "fastest" in res.output


def test_unwritable_report_folder_is_reported(tmp_path: Path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(small_raw(duration_s=30, policies=["dedicated"])))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = runner.invoke(app, ["sim", "-c", str(cfg), "--out", str(blocker), "--workers", "1"])
    assert res.exit_code == 1 and "cannot write the report" in res.output


def test_sim_trace_replays_a_users_jsonl_through_a_scenario(tmp_path: Path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(small_raw(duration_s=60, policies=["complementary"])))
    trace = tmp_path / "mine.jsonl"
    trace.write_text(
        "".join(
            f'{{"timestamp": {i * 400}, "input_length": 3000, "output_length": 50}}\n'
            for i in range(100)
        )
    )
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["sim", "-c", str(cfg), "--trace", str(trace), "--out", str(out), "--workers", "1"]
    )
    assert res.exit_code == 0, res.output
    assert "complementary" in res.output and "SLO met" in res.output
    assert (out / "small-mine-report.html").is_file()


def test_sim_trace_with_a_bad_row_exits_2_and_keeps_the_old_report(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    old = out / "default-bad-report.html"
    old.write_text("the previous report")
    trace = tmp_path / "bad.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:00:00,100,10\n2023-11-16 18:00:01,1e3,10\n"
    )
    res = runner.invoke(app, ["sim", "--trace", str(trace), "--out", str(out)])
    assert res.exit_code == 2
    assert f"{trace}, line 3, column 2 (ContextTokens): '1e3' is not a whole number" in (
        res.output.replace("\n", "")
    )
    assert "Traceback" not in res.output
    assert old.read_text() == "the previous report"


def test_sim_needs_a_config_or_a_trace():
    res = runner.invoke(app, ["sim"])
    assert res.exit_code == 2 and "--config" in res.output


def test_demo_duration_override_is_validated():
    res = runner.invoke(app, ["demo", "--duration-s", "-5"])
    assert res.exit_code == 2 and "duration_s" in res.output
