"""`copack workload replay`: replay a trace against an OpenAI-compatible endpoint, open-loop.

Each request is sent at its (time-scaled) arrival time whether or not earlier ones finished, as
real users would, so queueing shows up in the latencies instead of slowing the arrivals. Every
request streams (`stream_options.include_usage`) so time to first token and time per output
token are measured at the client: TTFT = first streamed token - send; TPOT = (end of the
answer - first token) / (output tokens - 1), vLLM's benchmark definition. A busy server hands
tokens over in bursts (vLLM merges the outputs its API process has not sent yet): when a short
answer arrives in one read, last - first is exactly zero, and the decode time the burst hid
shows up in TTFT instead. `ignore_eos` makes the server produce the trace's output length
(vLLM's own benchmarks do the same).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np
import orjson

from workloads.trace import TraceRequest, synth_prompt

PERCENTILES = (50, 90, 99)
SAMPLE_WORDS = 256


@dataclass
class RequestResult:
    index: int
    prompt_tokens_target: int
    output_tokens_target: int
    ok: bool = False
    error: str | None = None
    status: int | None = None
    sent_at: float = 0.0
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None  # as the server counted them (usage)
    output_tokens: int = 0


@dataclass
class ReplayReport:
    requests: int
    ok: int
    errors: int
    duration_s: float
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens per second
    ttft_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    latency_s: dict[str, float | None]
    prompt_tokens_mean: float | None
    prompt_tokens_target_mean: float
    output_tokens_total: int
    tokens_per_word: float
    clamped_prompts: int
    error_kinds: dict[str, int] = field(default_factory=dict)
    # the first error of each kind, as the server worded it: a count alone does not say why
    error_examples: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    arr = np.asarray(values, dtype=float)
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}


@dataclass
class ReplayConfig:
    url: str
    model: str | None = None
    endpoint: str = "/v1/completions"
    timeout_s: float = 600.0
    ignore_eos: bool = True
    calibrate: bool = True
    max_concurrency: int | None = None
    seed: int = 0


async def _server_info(
    client: httpx.AsyncClient, cfg: ReplayConfig
) -> tuple[str, float, int | None]:
    """The model to name, tokens per synthetic word, and the server's max context if known."""
    model = cfg.model
    if model is None:
        try:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = str(r.json()["data"][0]["id"])
        except (httpx.HTTPError, KeyError, IndexError, ValueError, TypeError) as e:
            raise ReplayError(
                f"cannot find the served model at {cfg.url}/v1/models ({e}); pass --model"
            ) from None
    tokens_per_word, max_len = 1.0, None
    if cfg.calibrate:
        sample = synth_prompt(SAMPLE_WORDS, seed=cfg.seed + 10**6)
        try:
            r = await client.post(
                "/tokenize",
                json={"model": model, "prompt": sample, "add_special_tokens": False},
            )
            if r.status_code == 200:
                body = r.json()
                count = int(body["count"])
                if count > 0:
                    tokens_per_word = count / SAMPLE_WORDS
                ml = body.get("max_model_len")
                max_len = int(ml) if isinstance(ml, int) and ml > 0 else None
        except (httpx.HTTPError, KeyError, ValueError, TypeError):
            pass  # no /tokenize: keep one token per word
    return model, tokens_per_word, max_len


class ReplayError(RuntimeError):
    """The replay cannot start (endpoint unreachable, no model); says what to fix."""


async def _one(
    client: httpx.AsyncClient,
    cfg: ReplayConfig,
    model: str,
    index: int,
    req: TraceRequest,
    prompt: str,
    result: RequestResult,
) -> None:
    chat = cfg.endpoint.endswith("/chat/completions")
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    t0 = time.perf_counter()
    result.sent_at = t0
    first: float | None = None
    events = 0
    tail = b""
    try:
        async with client.stream("POST", cfg.endpoint, content=orjson.dumps(body)) as r:
            result.status = r.status_code
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", errors="replace")[:300]
                result.error = f"HTTP {r.status_code}: {text}"
                return
            async for chunk in r.aiter_raw():
                now = time.perf_counter()
                parts = (tail + chunk).split(b"\n\n")
                tail = parts.pop()
                for ev in parts:
                    if not ev.startswith(b"data:") or ev.startswith(b"data: [DONE]"):
                        continue
                    try:
                        data = orjson.loads(ev[5:])
                    except orjson.JSONDecodeError:
                        result.error = "malformed stream event"
                        return
                    if "error" in data:
                        err = data["error"]
                        result.error = f"stream error: {err.get('message', err)}"[:300]
                        return
                    if data.get("choices"):
                        events += 1
                        if first is None:
                            first = now
                    usage = data.get("usage")
                    if usage:
                        result.prompt_tokens = usage.get("prompt_tokens")
                        result.output_tokens = int(usage.get("completion_tokens") or 0)
    except httpx.TimeoutException:
        result.error = "timeout"
        return
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"[:300]
        return
    end = time.perf_counter()
    if first is None:
        result.error = "no tokens in the answer"
        return
    result.ok = True
    if not result.output_tokens:
        result.output_tokens = events
    result.ttft_s = first - t0
    result.latency_s = end - t0
    if result.output_tokens > 1:
        result.tpot_s = (end - first) / (result.output_tokens - 1)


async def replay_async(
    trace: Sequence[TraceRequest],
    cfg: ReplayConfig,
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[ReplayReport, list[RequestResult]]:
    if not trace:
        raise ReplayError("the trace is empty")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(cfg.timeout_s, connect=10.0)
    async with httpx.AsyncClient(
        base_url=cfg.url.rstrip("/"), timeout=timeout, limits=limits, trust_env=False
    ) as client:
        try:
            model, tpw, max_len = await _server_info(client, cfg)
        except httpx.HTTPError as e:
            raise ReplayError(f"cannot reach {cfg.url}: {e}") from None
        clamped = 0
        prompts: list[str] = []
        for i, r in enumerate(trace):
            n = r.prompt_tokens
            if max_len is not None and n + r.output_tokens + 8 > max_len:
                n = max(1, max_len - r.output_tokens - 8)
                clamped += 1
            prompts.append(synth_prompt(n, seed=cfg.seed + i, tokens_per_word=tpw))
        results = [
            RequestResult(i, r.prompt_tokens, r.output_tokens) for i, r in enumerate(trace)
        ]
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        start = time.perf_counter()

        async def launch(i: int) -> None:
            delay = start + trace[i].at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is not None:
                async with sem:
                    await _one(client, cfg, model, i, trace[i], prompts[i], results[i])
            else:
                await _one(client, cfg, model, i, trace[i], prompts[i], results[i])
            if on_done is not None:
                on_done(results[i])

        await asyncio.gather(*(launch(i) for i in range(len(trace))))
        duration = time.perf_counter() - start
    return summarize(results, duration, tpw, clamped), results


def summarize(
    results: Sequence[RequestResult], duration_s: float, tokens_per_word: float, clamped: int
) -> ReplayReport:
    ok = [r for r in results if r.ok]
    kinds: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in results:
        if not r.ok:
            kind = (r.error or "error").split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
            examples.setdefault(kind, r.error or "error")
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_counts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return ReplayReport(
        requests=len(results),
        ok=len(ok),
        errors=len(results) - len(ok),
        duration_s=duration_s,
        request_throughput=len(ok) / duration_s if duration_s > 0 else 0.0,
        output_throughput=out_tokens / duration_s if duration_s > 0 else 0.0,
        ttft_s=percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        latency_s=percentiles([r.latency_s for r in ok if r.latency_s is not None]),
        prompt_tokens_mean=float(np.mean(prompt_counts)) if prompt_counts else None,
        prompt_tokens_target_mean=float(np.mean([r.prompt_tokens_target for r in results])),
        output_tokens_total=out_tokens,
        tokens_per_word=tokens_per_word,
        clamped_prompts=clamped,
        error_kinds=kinds,
        error_examples=examples,
    )


def replay(
    trace: Sequence[TraceRequest],
    cfg: ReplayConfig,
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[ReplayReport, list[RequestResult]]:
    return asyncio.run(replay_async(trace, cfg, on_done))


def format_report(rep: ReplayReport) -> str:
    def ms(d: dict[str, float | None]) -> str:
        return "  ".join(
            f"{k} {v * 1000:8.1f} ms" if v is not None else f"{k}        -" for k, v in d.items()
        )

    kinds = ", ".join(f"{k}: {v}" for k, v in rep.error_kinds.items())
    lines = [
        f"requests     {rep.requests}  ok {rep.ok}  errors {rep.errors}"
        + (f"  ({kinds})" if rep.errors else ""),
        f"duration     {rep.duration_s:.2f} s",
        f"throughput   {rep.request_throughput:.2f} req/s  "
        f"{rep.output_throughput:.1f} output tok/s",
        f"TTFT         {ms(rep.ttft_s)}",
        f"TPOT         {ms(rep.tpot_s)}",
        f"latency      {ms(rep.latency_s)}",
        f"prompt tok   target mean {rep.prompt_tokens_target_mean:.1f}, server-counted mean "
        + (f"{rep.prompt_tokens_mean:.1f}" if rep.prompt_tokens_mean is not None else "-")
        + f" ({rep.tokens_per_word:.2f} tokens/word"
        + (f", {rep.clamped_prompts} clamped to the context" if rep.clamped_prompts else "")
        + ")",
    ]
    lines += [f"first {k:6s} {text}" for k, text in rep.error_examples.items()]
    return "\n".join(lines)
