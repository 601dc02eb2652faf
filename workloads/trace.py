"""Request traces to replay: the Azure LLM inference traces, and prompts sized to match them.

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
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

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


def _parse_time(text: str) -> datetime:
    # The Azure files carry 7 fractional digits; datetime takes at most 6.
    head, dot, frac = text.strip().partition(".")
    return datetime.fromisoformat(f"{head}.{frac[:6]}" if dot else head)


def load_azure_trace(path: Path | str, limit: int | None = None) -> list[TraceRequest]:
    """Read an Azure LLM trace CSV; arrival offsets are relative to its first request."""
    p = Path(path)
    if limit is not None and limit < 1:
        raise TraceError(f"limit must be at least 1, got {limit}")
    try:
        fh = p.open(newline="", encoding="utf-8")
    except OSError as e:
        raise TraceError(f"cannot read trace {p}: {e.strerror or e}") from None
    out: list[TraceRequest] = []
    with fh:
        reader = csv.DictReader(fh)
        missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(
                f"{p}: missing column(s) {', '.join(missing)} "
                f"(expected header {','.join(AZURE_COLUMNS)})"
            )
        t0: datetime | None = None
        for row in reader:
            line = reader.line_num
            try:
                ts = _parse_time(row["TIMESTAMP"] or "")
            except ValueError:
                raise TraceError(
                    f"{p}:{line}: TIMESTAMP {row['TIMESTAMP']!r} is not a date-time"
                ) from None
            counts = []
            for col in ("ContextTokens", "GeneratedTokens"):
                try:
                    n = int(row[col] or "")
                except ValueError:
                    raise TraceError(f"{p}:{line}: {col} {row[col]!r} is not a number") from None
                if n < 0:
                    raise TraceError(f"{p}:{line}: {col} {n} is negative")
                counts.append(n)
            if t0 is None:
                t0 = ts
            at = (ts - t0).total_seconds()
            if at < 0:
                raise TraceError(f"{p}:{line}: TIMESTAMP goes back in time")
            out.append(TraceRequest(at, max(1, counts[0]), max(1, counts[1])))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise TraceError(f"{p}: no requests in the trace")
    return out


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
