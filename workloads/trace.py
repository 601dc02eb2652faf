"""Request traces to replay: the Azure LLM inference traces (or any trace with the same fields,
as CSV or JSON lines), and prompts sized to match them.

The Azure files (`TIMESTAMP,ContextTokens,GeneratedTokens`, Splitwise, ISCA'24) give arrival
times and token counts but no text. Prompts are synthesized: a sequence of common short English
words ("the", "of", "time", ...), each a single token with its leading space in the BPE
vocabularies of GPT-2, Llama 2/3, Mistral and Qwen, so N words ≈ N prompt tokens without a
tokenizer. When the server offers vLLM's `/tokenize`, the load generator measures the actual
tokens per word once and rescales (`calibrate`), which makes the count exact to a few percent
for any tokenizer (the e2e test's byte-level tokenizer needs ~4.6 tokens per word). Words are
drawn pseudo-randomly per request so prompts share no prefix and prefix caching cannot hide
the prefill work.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

# Single tokens (with a leading space) in GPT-2, Llama 2/3, Mistral and Qwen BPE vocabularies.
WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on",
    "are", "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one",
    "had", "by", "word", "but", "not", "what", "all", "were", "we", "when", "your", "can",
    "said", "there", "use", "an", "each", "which", "she", "do", "how", "their", "if",
    "will", "up", "other", "about", "out", "many", "then", "them", "these", "so", "some",
    "her", "would", "make", "like", "him", "into", "time", "has", "look", "two", "more",
    "write", "go", "see", "number", "no", "way", "could", "people", "my", "than", "first",
    "water", "been", "call", "who", "its", "now", "find", "long", "down", "day", "did",
    "get", "come", "made", "may", "part",
)  # fmt: skip


class TraceError(ValueError):
    """A trace file that cannot be replayed; names the file, line and field at fault."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request: when it arrives (seconds after the first) and its token counts."""

    at_s: float
    prompt_tokens: int
    output_tokens: int


# JSON-lines traces (Mooncake, BurstGPT-style exports): one object per line, `timestamp` in ms.
JSONL_KEYS = ("timestamp", "input_length", "output_length")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def _parse_time(text: str) -> datetime:
    # The Azure files carry 7 fractional digits; datetime takes at most 6.
    head, dot, frac = text.strip().partition(".")
    return datetime.fromisoformat(f"{head}.{frac[:6]}" if dot else head)


def load_trace_file(path: Path | str, limit: int | None = None) -> list[TraceRequest]:
    """Read a trace: a CSV with the Azure columns (`TIMESTAMP,ContextTokens,GeneratedTokens`)
    or JSON lines with `timestamp` (ms), `input_length`, `output_length`. Arrival offsets are
    relative to the first request; a malformed row is a TraceError naming file, line and column.
    """
    p = Path(path)
    if limit is not None and limit < 1:
        raise TraceError(f"limit must be at least 1, got {limit}")
    try:
        fh = p.open(newline="", encoding="utf-8")
    except OSError as e:
        raise TraceError(f"cannot read trace {p}: {e.strerror or e}") from None
    with fh:
        try:
            head = fh.read(4096)
            fh.seek(0)
            is_jsonl = p.suffix.lower() in JSONL_SUFFIXES or head.lstrip().startswith("{")
            rows = _jsonl_rows(p, fh) if is_jsonl else _csv_rows(p, fh)
            out = _relative(p, rows, limit)
        except UnicodeDecodeError as e:
            raise TraceError(f"trace {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not out:
        raise TraceError(f"trace {p}: no requests in the trace")
    return out


Row = tuple[int, float, int, int]  # line, arrival (s, absolute), prompt, output


def _relative(p: Path, rows: Iterable[Row], limit: int | None) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    t0: float | None = None
    last = -math.inf
    for line, t, prompt, output in rows:
        if t < last:
            raise TraceError(f"trace {p}, line {line}: timestamp goes back in time")
        last = t
        if t0 is None:
            t0 = t
        out.append(TraceRequest(t - t0, max(1, prompt), max(1, output)))
        if limit is not None and len(out) >= limit:
            break
    return out


def _csv_rows(p: Path, fh: TextIO) -> Iterator[Row]:
    reader = csv.reader(fh)
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in AZURE_COLUMNS if c not in header]
    if missing:
        raise TraceError(
            f"trace {p}: missing column(s) {', '.join(missing)} "
            f"(expected header {','.join(AZURE_COLUMNS)}, or JSON lines with "
            f"{', '.join(JSONL_KEYS)})"
        )
    cols = [header.index(c) for c in AZURE_COLUMNS]
    for row in reader:
        line = reader.line_num
        if not row or not any(f.strip() for f in row):
            continue
        if len(row) <= max(cols):
            raise TraceError(
                f"trace {p}, line {line}: {len(row)} field(s), the header has {len(header)}"
            )

        def where(k: int, line: int = line) -> str:
            return f"trace {p}, line {line}, column {cols[k] + 1} ({AZURE_COLUMNS[k]})"

        text = row[cols[0]]
        try:
            t = _parse_time(text).replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise TraceError(f"{where(0)}: {text!r} is not a date-time") from None
        counts = [_count(row[cols[k]], lambda k=k: where(k)) for k in (1, 2)]
        yield line, t, counts[0], counts[1]


def _count(text: object, where: Callable[[], str]) -> int:
    if isinstance(text, str):
        try:
            n = int(text.strip())
        except ValueError:
            raise TraceError(f"{where()}: {text!r} is not a whole number") from None
    elif isinstance(text, int) and not isinstance(text, bool):
        n = text
    elif isinstance(text, float) and text.is_integer():
        n = int(text)
    else:
        raise TraceError(f"{where()}: {text!r} is not a whole number")
    if n < 0:
        raise TraceError(f"{where()}: {n} is negative")
    return n


def _jsonl_rows(p: Path, fh: TextIO) -> Iterator[Row]:
    for line, text in enumerate(fh, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceError(
                f"trace {p}, line {line}, column {e.colno}: not JSON ({e.msg})"
            ) from None
        if not isinstance(obj, dict):
            raise TraceError(f"trace {p}, line {line}: expected a JSON object, got {obj!r:.40}")
        for key in JSONL_KEYS:
            if key not in obj:
                raise TraceError(
                    f"trace {p}, line {line}: no {key!r} (needs {', '.join(JSONL_KEYS)})"
                )

        def where(key: str, line: int = line) -> str:
            return f"trace {p}, line {line}, column {key!r}"

        ts = obj["timestamp"]
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise TraceError(f"{where('timestamp')}: {ts!r} is not a number of milliseconds")
        prompt = _count(obj["input_length"], lambda: where("input_length"))
        output = _count(obj["output_length"], lambda: where("output_length"))
        yield line, ts / 1e3, prompt, output


def shape_trace(
    requests: Iterable[TraceRequest],
    *,
    speedup: float = 1.0,
    prompt_scale: float = 1.0,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
) -> list[TraceRequest]:
    """Time-scale a trace (speedup 10 = ten times faster) and scale or cap its token counts.

    Small test models have short context windows: prompts are multiplied by `prompt_scale`
    and then capped, so the trace's length distribution keeps its shape where it fits.
    """
    if speedup <= 0:
        raise TraceError(f"speedup must be positive, got {speedup}")
    if prompt_scale <= 0:
        raise TraceError(f"prompt scale must be positive, got {prompt_scale}")
    for name, cap in (("max prompt tokens", max_prompt_tokens), ("max output", max_output_tokens)):
        if cap is not None and cap < 1:
            raise TraceError(f"{name} must be at least 1, got {cap}")
    out = []
    for r in requests:
        prompt = max(1, round(r.prompt_tokens * prompt_scale))
        if max_prompt_tokens is not None:
            prompt = min(prompt, max_prompt_tokens)
        output = r.output_tokens
        if max_output_tokens is not None:
            output = min(output, max_output_tokens)
        out.append(replace(r, at_s=r.at_s / speedup, prompt_tokens=prompt, output_tokens=output))
    return out


def synth_prompt(tokens: int, *, seed: int, tokens_per_word: float = 1.0) -> str:
    """Text of about `tokens` tokens: tokens / tokens_per_word words from WORDS."""
    if tokens_per_word <= 0:
        raise ValueError("tokens_per_word must be positive")
    n_words = max(1, round(tokens / tokens_per_word))
    rng = random.Random(seed)
    return " ".join(rng.choices(WORDS, k=n_words))
