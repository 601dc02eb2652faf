"""Trace loading/shaping and the load generator against stub servers (real HTTP)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from copack.cli import app
from tests.workloads.stub_vllm import ServerThread, create_stub_app, free_port
from workloads.loadgen import ReplayConfig, ReplayError, format_report, percentiles, replay
from workloads.proxy import PDProxy, ProxyConfig
from workloads.trace import (
    WORDS,
    TraceError,
    TraceRequest,
    load_trace_file,
    shape_trace,
    synth_prompt,
)

TRACE = Path(__file__).parent / "data" / "azure_conv_first20.csv"


def test_azure_trace_is_read_with_relative_arrivals() -> None:
    reqs = load_trace_file(TRACE)
    assert len(reqs) == 20
    assert reqs[0] == TraceRequest(0.0, 374, 44)
    # 18:15:46.6805900 -> 18:15:50.9951690 (7 fractional digits in the file)
    assert reqs[1].at_s == pytest.approx(4.314579, abs=1e-6)
    assert all(b.at_s >= a.at_s for a, b in itertools.pairwise(reqs))
    assert len(load_trace_file(TRACE, limit=5)) == 5


def test_shaping_scales_time_and_tokens() -> None:
    reqs = [TraceRequest(10.0, 1000, 200), TraceRequest(20.0, 10, 5)]
    out = shape_trace(
        reqs, speedup=10, prompt_scale=0.5, max_prompt_tokens=300, max_output_tokens=100
    )
    assert out == [TraceRequest(1.0, 300, 100), TraceRequest(2.0, 5, 5)]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("a,b,c\n1,2,3\n", "missing column"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n", "line 2, column 1 .TIMESTAMP"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,x,2\n", "ContextTokens"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,-4,2\n", "negative"),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n"
            "2023-11-16 18:15:46.1,1,2\n2023-11-16 18:15:40.1,1,2\n",
            "back in time",
        ),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
    ],
)
def test_bad_traces_name_the_problem(tmp_path: Path, content: str, fragment: str) -> None:
    p = tmp_path / "t.csv"
    p.write_text(content)
    with pytest.raises(TraceError, match=fragment):
        load_trace_file(p)


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace_file(tmp_path / "nope.csv")


@pytest.mark.parametrize("kw", [{"speedup": 0}, {"prompt_scale": -1}, {"max_prompt_tokens": 0}])
def test_bad_shaping_options(kw: dict) -> None:
    with pytest.raises(TraceError):
        shape_trace([TraceRequest(0, 1, 1)], **kw)


def test_synthetic_prompts_have_the_asked_word_count_and_differ() -> None:
    a = synth_prompt(100, seed=1)
    assert len(a.split()) == 100 and set(a.split()) <= set(WORDS)
    assert len(synth_prompt(100, seed=1, tokens_per_word=4).split()) == 25
    assert synth_prompt(100, seed=2) != a
    assert synth_prompt(100, seed=1) == a


def test_percentiles() -> None:
    p = percentiles([float(i) for i in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


@pytest.fixture
def stub() -> ServerThread:
    app_, state = create_stub_app("s")
    state.behaviour.token_delay_s = 0.002
    server = ServerThread(app_).start()
    server.state = state  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_replay_against_a_stub_measures_everything(stub: ServerThread) -> None:
    trace = shape_trace(load_trace_file(TRACE, limit=8), speedup=20, max_output_tokens=6)
    done = []
    report, results = replay(trace, ReplayConfig(url=stub.url), on_done=done.append)
    assert report.requests == 8 and report.ok == 8 and report.errors == 0
    assert len(done) == 8
    assert report.output_tokens_total == sum(min(6, r.output_tokens) for r in trace)
    assert report.ttft_s["p50"] is not None and report.tpot_s["p99"] is not None
    assert report.tpot_s["p50"] >= 0.002 * 0.5
    # The stub's /tokenize counts two tokens per word: prompts got half the words.
    assert report.tokens_per_word == pytest.approx(2.0)
    sent = stub.state.requests  # type: ignore[attr-defined]
    for body in sent:
        assert body["stream"] is True and body["ignore_eos"] is True
        assert body["model"] == "stub-model"
    words = sorted(len(b["prompt"].split()) for b in sent)
    assert words == sorted(round(r.prompt_tokens / 2) for r in trace)
    assert all(r.ok for r in results)


def test_replay_through_the_proxy_with_chat(stub: ServerThread) -> None:
    proxy = ServerThread(PDProxy(ProxyConfig(prefill=[stub.url], decode=[stub.url])).app).start()
    try:
        trace = [TraceRequest(0.0, 20, 3), TraceRequest(0.01, 30, 4)]
        cfg = ReplayConfig(url=proxy.url, endpoint="/v1/chat/completions", calibrate=False)
        report, _ = replay(trace, cfg)
        assert report.ok == 2 and report.output_tokens_total == 7
        assert report.tokens_per_word == 1.0
    finally:
        proxy.stop()


def test_backend_errors_are_counted_not_raised(stub: ServerThread) -> None:
    stub.state.behaviour.mode = "error500"  # type: ignore[attr-defined]
    report, _results = replay([TraceRequest(0, 5, 2)] * 3, ReplayConfig(url=stub.url, model="m"))
    assert report.ok == 0 and report.errors == 3
    assert report.error_kinds == {"HTTP 500": 3}
    assert report.error_examples["HTTP 500"].startswith("HTTP 500: ")
    assert "first HTTP 500 HTTP 500: " in format_report(report)
    assert report.ttft_s["p50"] is None


def test_cut_streams_are_errors(stub: ServerThread) -> None:
    stub.state.behaviour.mode = "cut"  # type: ignore[attr-defined]
    report, results = replay([TraceRequest(0, 5, 4)], ReplayConfig(url=stub.url, model="m"))
    assert report.errors == 1 and results[0].error


def test_unreachable_endpoint_is_a_clear_error() -> None:
    with pytest.raises(ReplayError, match="cannot"):
        replay([TraceRequest(0, 5, 2)], ReplayConfig(url=f"http://127.0.0.1:{free_port()}"))


def test_cli_replay_prints_and_writes_a_report(stub: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        ["workload", "replay", "--trace", str(TRACE), "--url", stub.url, "--limit", "4",
         "--speedup", "50", "--max-output-tokens", "3", "--json-out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "TTFT" in result.stdout and "TPOT" in result.stdout and "p99" in result.stdout
    assert json.loads(out.read_text())["ok"] == 4


def test_cli_replay_bad_trace_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("x\n1\n")
    result = CliRunner().invoke(
        app, ["workload", "replay", "--trace", str(bad), "--url", "http://127.0.0.1:9"]
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "missing column" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("cap", "expect_overlap"), [(1, False), (None, True)])
def test_max_concurrency_caps_requests_in_flight(
    stub: ServerThread, cap: int | None, expect_overlap: bool
) -> None:
    stub.state.behaviour.first_token_delay_s = 0.2  # type: ignore[attr-defined]
    trace = [TraceRequest(0.0, 5, 2)] * 4
    report, _ = replay(trace, ReplayConfig(url=stub.url, model="m", max_concurrency=cap))
    assert report.ok == 4
    peak = stub.state.max_in_flight  # type: ignore[attr-defined]
    assert (peak > 1) is expect_overlap, peak
