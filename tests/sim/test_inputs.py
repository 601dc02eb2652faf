"""Traces, scenario files and their validation errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sim.scenario import ScenarioError, default_scenario, load_scenario, parse_scenario
from sim.traces import DATA_DIR_ENV, TraceError, load_trace, replay
from workloads.data import PACKAGE_DATA, trace_file

SMALL = {
    "name": "t",
    "duration_s": 120,
    "cluster": {"pools": [{"name": "a", "count": 1, "gpus_per_node": 2, "product": "H100-SXM"}]},
    "services": [
        {
            "name": "s1",
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "trace": "conv",
            "slo": {"ttft_s": 1, "tpot_s": 0.05},
        }
    ],
}


def test_azure_traces_load_with_their_published_shape():
    code, conv = load_trace("code"), load_trace("conv")
    assert len(code) == 8819 and len(conv) == 19366
    assert code.prompt_tokens.mean() == pytest.approx(2048, rel=0.01)
    assert conv.output_tokens.mean() == pytest.approx(211, rel=0.01)
    assert np.all(np.diff(conv.arrival_s) >= 0) and conv.arrival_s[0] == 0.0


def test_replay_scales_rate_and_is_deterministic():
    conv = load_trace("conv")
    t1, _p1, _ = replay(conv, duration_s=3500, rate=1.0, rng=np.random.default_rng(1))
    t2, p2, _ = replay(conv, duration_s=3500, rate=2.5, rng=np.random.default_rng(1))
    t3, p3, _ = replay(conv, duration_s=3500, rate=2.5, rng=np.random.default_rng(1))
    assert len(t2) / len(t1) == pytest.approx(2.5, rel=0.05)
    assert np.array_equal(t2, t3) and np.array_equal(p2, p3)
    assert t2.min() >= 0 and t2.max() < 3500
    fast, _, _ = replay(conv, duration_s=1750, time_scale=2.0, rng=np.random.default_rng(1))
    assert len(fast) == pytest.approx(len(t1), rel=0.02)


def test_replay_loops_a_trace_shorter_than_the_window():
    code = load_trace("code")
    t, _, _ = replay(code, duration_s=2 * 3600, rng=np.random.default_rng(0))
    assert t.max() > 3600 and len(t) == pytest.approx(2 * len(code), rel=0.05)


def test_bundled_traces_need_no_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    load_trace.cache_clear()
    try:
        assert trace_file("code").parent == PACKAGE_DATA
        assert len(load_trace("code")) == 8819
    finally:
        load_trace.cache_clear()


def test_data_dir_override_and_bad_files(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    load_trace.cache_clear()
    try:
        with pytest.raises(TraceError, match=DATA_DIR_ENV):
            load_trace("code")
        (tmp_path / "azure_llm_2023_code.csv").write_text(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,5,3\n"
        )
        assert len(load_trace("code")) == 1  # read from the override, not the bundled copy
        bad = tmp_path / "bad.csv"
        bad.write_text("time,in,out\n1,2,3\n")
        with pytest.raises(TraceError, match="missing column"):
            load_trace(str(bad))
        worse = tmp_path / "worse.csv"
        worse.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,abc,3\n")
        with pytest.raises(TraceError, match="line 2, column 2"):
            load_trace(str(worse))
    finally:
        load_trace.cache_clear()


def test_default_scenario_is_valid_and_matches_the_issue():
    s = default_scenario()
    assert sum(p.count for p in s.cluster.pools) == 16
    assert {p.gpus_per_node for p in s.cluster.pools} == {8}
    assert s.duration_s == 3600
    models = {svc.model for svc in s.services}
    assert {
        "meta-llama/Llama-3.1-8B-Instruct",
        "Qwen/Qwen2.5-7B-Instruct",
        "Qwen/Qwen2.5-32B-Instruct",
    } <= models
    assert any(p.mig_layouts for p in s.cluster.pools)
    assert {p.sharing for p in s.cluster.pools} == {"mps", "time-slicing"}
    assert set(s.policies) == {"dedicated", "spread", "binpack", "complementary"}


def _bad(mutate) -> str:
    import copy

    raw = copy.deepcopy(SMALL)
    mutate(raw)
    with pytest.raises(ScenarioError) as e:
        parse_scenario(raw, "x.yaml")
    return str(e.value)


def test_validation_errors_name_the_field():
    assert parse_scenario(SMALL).name == "t"
    msg = _bad(
        lambda r: r["cluster"]["pools"][0].update(mig_layouts=[["3g.40gb", "3g.40gb", "1g.10gb"]])
    )
    assert "cluster.pools[0].mig_layouts[0]" in msg and "does not fit" in msg
    msg = _bad(lambda r: r["services"][0].update(model="gpt-5"))
    assert "services[0].model" in msg and "unknown model" in msg
    msg = _bad(lambda r: r["cluster"]["pools"][0].update(product="TPU-v5"))
    assert "cluster.pools[0].product" in msg
    msg = _bad(lambda r: r["services"][0].update(rate=-1))
    assert "services.0.rate" in msg
    msg = _bad(lambda r: r.update(colour="blue"))
    assert "colour" in msg and "Extra inputs" in msg
    msg = _bad(lambda r: r["services"].append(dict(r["services"][0])))
    assert "duplicate service names" in msg
    msg = _bad(lambda r: r.update(policies=["fastest"]))
    assert "policies.0" in msg
    msg = _bad(lambda r: r["services"][0].update(trace="nope.csv"))
    assert "services[0].trace" in msg and "not found" in msg
    msg = _bad(lambda r: r.update(extender={"policy": {"overcommit": 9}}))
    assert "extender" in msg and "overcommit" in msg


def test_load_scenario_reports_unreadable_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")
    f = tmp_path / "s.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(f)
    f.write_text("- a list\n")
    with pytest.raises(ScenarioError, match="mapping"):
        load_scenario(f)


def test_trace_paths_in_a_scenario_file_are_relative_to_it(tmp_path: Path):
    import yaml

    from sim.workload import build_workload

    (tmp_path / "t.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:00:00.0,100,10\n2023-11-16 18:00:01.5,200,20\n"
        "2023-11-16 18:00:03.0,300,30\n"
    )
    raw = {**SMALL, "services": [{**SMALL["services"][0], "trace": "t.csv"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    s = load_scenario(tmp_path / "s.yaml")
    assert s.services[0].trace == str(tmp_path / "t.csv")
    wl = build_workload(s)
    assert set(wl.prompt.tolist()) == {100, 200, 300}
    assert len(wl) == 80  # looped: one request per 1.5 s over 120 s


def test_a_malformed_trace_row_is_reported_when_the_scenario_loads(tmp_path: Path):
    bad = tmp_path / "t.jsonl"
    bad.write_text(
        '{"timestamp": 0, "input_length": 10, "output_length": 2}\n'
        '{"timestamp": 5, "input_length": "ten", "output_length": 2}\n'
    )
    msg = _bad(lambda r: r["services"][0].update(trace=str(bad)))
    assert "services[0].trace" in msg
    assert f"{bad}, line 2, column 'input_length'" in msg and "not a whole number" in msg


def test_with_trace_replays_one_file_in_every_service(tmp_path: Path):
    from sim.scenario import with_trace
    from sim.workload import build_workload

    f = tmp_path / "my traffic.jsonl"
    f.write_text(
        "".join(
            f'{{"timestamp": {i * 500}, "input_length": 9000, "output_length": 300}}\n'
            for i in range(20)
        )
    )
    base = parse_scenario({**SMALL, "services": [SMALL["services"][0], {
        **SMALL["services"][0], "name": "s2", "trace": "code"}]})
    s = with_trace(base, f)
    assert s.name == "t-my-traffic"
    assert {svc.trace for svc in s.services} == {str(f.resolve())}
    wl = build_workload(s)
    assert set(wl.prompt.tolist()) == {9000} and set(wl.output.tolist()) == {300}


def test_length_scales_and_the_prompt_cap_shape_a_service_s_requests():
    from sim.workload import build_workload

    raw = {**SMALL, "services": [{**SMALL["services"][0]}]}
    base = build_workload(parse_scenario(raw))
    svc = {**SMALL["services"][0], "prompt_scale": 10, "output_scale": 2, "max_prompt_tokens": 9000}
    long = build_workload(parse_scenario({**SMALL, "services": [svc]}))
    # the same arrivals, longer requests, none over the cap
    assert np.array_equal(base.arrival, long.arrival)
    want = np.minimum(np.maximum(1, np.rint(base.prompt * 10)), 9000)
    assert np.array_equal(long.prompt, want) and long.prompt.max() == 9000
    assert np.array_equal(long.output, np.maximum(1, np.rint(base.output * 2)))
    with pytest.raises(ScenarioError, match="prompt_scale"):
        parse_scenario({**SMALL, "services": [{**svc, "prompt_scale": 0}]})


def test_the_long_prompt_scenario_is_embedded_and_long():
    from sim.scenario import LONG_SCENARIO
    from sim.workload import build_workload

    s = load_scenario(LONG_SCENARIO)
    wl = build_workload(s)
    assert 8000 <= wl.prompt.mean() <= 16000
    assert len(s.services) < len(default_scenario().services)


def test_the_model_mix_scenario_is_embedded_with_models_the_others_do_not_run():
    from sim.catalog import model, unit_type
    from sim.deployment import service_references
    from sim.scenario import LONG_SCENARIO, MIX_SCENARIO
    from sim.workload import build_workload

    mix = load_scenario(MIX_SCENARIO)
    others = {s.model for sc in (default_scenario(), load_scenario(LONG_SCENARIO))
              for s in sc.services}
    assert {s.model for s in mix.services} - others >= {
        "mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mixtral-8x7B-Instruct-v0.1"}
    refs = service_references(mix, [model(s.model) for s in mix.services], build_workload(mix))
    moe = [r for s, r in zip(mix.services, refs, strict=True) if "Mixtral" in s.model]
    assert moe and all(r == unit_type("H200", None) for r in moe)
