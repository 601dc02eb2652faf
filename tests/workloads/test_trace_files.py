"""Trace files a user brings: Azure-style CSV and Mooncake/BurstGPT-style JSON lines, and the
errors a malformed row gets (file, line, column)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workloads.data import PACKAGE_DATA, TRACE_FILES
from workloads.trace import TraceError, TraceRequest, load_trace_file


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_bundled_traces_are_package_data() -> None:
    for name in TRACE_FILES.values():
        assert (PACKAGE_DATA / name).is_file()
    conv = load_trace_file(PACKAGE_DATA / TRACE_FILES["conv"])
    assert len(conv) == 19366 and conv[0] == TraceRequest(0.0, 374, 44)


def test_jsonl_and_csv_of_the_same_requests_read_the_same(tmp_path: Path) -> None:
    csv = _write(
        tmp_path,
        "t.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:00:00.0000000,100,10\n2023-11-16 18:00:01.2500000,2000,0\n",
    )
    jsonl = _write(
        tmp_path,
        "t.jsonl",
        '{"timestamp": 27482, "input_length": 100, "output_length": 10, "hash_ids": [1, 2]}\n'
        "\n"
        '{"timestamp": 28732, "input_length": 2000, "output_length": 0}\n',
    )
    expected = [TraceRequest(0.0, 100, 10), TraceRequest(1.25, 2000, 1)]  # 0 tokens -> 1
    assert load_trace_file(csv) == expected
    assert load_trace_file(jsonl) == expected


def test_json_lines_are_recognised_by_content_too(tmp_path: Path) -> None:
    p = _write(tmp_path, "trace.txt", '{"timestamp": 0, "input_length": 5, "output_length": 6}\n')
    assert load_trace_file(p) == [TraceRequest(0.0, 5, 6)]


def test_csv_columns_may_come_in_any_order_with_extra_ones(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "t.csv",
        "GeneratedTokens,Model,TIMESTAMP,ContextTokens\n7,x,2023-11-16 18:00:00,50\n",
    )
    assert load_trace_file(p) == [TraceRequest(0.0, 50, 7)]


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,1\n",
         r"line 2: 2 field\(s\), the header has 3"),
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,1,2.5\n",
         r"line 2, column 3 \(GeneratedTokens\): '2.5' is not a whole number"),
        ("a.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n{"timestamp": 1,\n',
         r"line 2, column \d+: not JSON"),
        ("a.jsonl", "[1, 2, 3]\n", "line 1: expected a JSON object"),
        ("a.jsonl", '{"timestamp": 0, "input_length": 1}\n', "line 1: no 'output_length'"),
        ("a.jsonl", '{"timestamp": "noon", "input_length": 1, "output_length": 1}\n',
         "line 1, column 'timestamp': 'noon' is not a number of milliseconds"),
        ("a.jsonl", '{"timestamp": 0, "input_length": true, "output_length": 1}\n',
         "column 'input_length': True is not a whole number"),
        ("a.jsonl", '{"timestamp": 0, "input_length": -3, "output_length": 1}\n',
         "column 'input_length': -3 is negative"),
        ("a.jsonl", '{"timestamp": 9, "input_length": 1, "output_length": 1}\n'
         '{"timestamp": 2, "input_length": 1, "output_length": 1}\n',
         "line 2: timestamp goes back"),
        ("a.jsonl", "\n\n", "no requests"),
    ],
)
def test_malformed_rows_name_file_line_and_column(
    tmp_path: Path, name: str, content: str, fragment: str
) -> None:
    p = _write(tmp_path, name, content)
    with pytest.raises(TraceError, match=fragment) as e:
        load_trace_file(p)
    assert str(p) in str(e.value)


def test_binary_and_unreadable_files(tmp_path: Path) -> None:
    p = tmp_path / "b.csv"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TraceError, match="not UTF-8"):
        load_trace_file(p)
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace_file(tmp_path)
