"""Latency the P/D proxy adds per request: TTFT through the proxy minus TTFT without it.

Backends are stub vLLM servers (tests/workloads/stub_vllm.py: real uvicorn HTTP servers on
loopback that answer at once), so what is measured is the proxy alone. Each process is its
own: stubs in one, each proxy (`copack workload proxy`, as deployed) in another, the client
here, so they do not share a GIL. Requests are sequential and the four paths are interleaved
per iteration so they see the same machine noise:

  direct decode      client -> decode stub (stream)
  client P/D         client -> prefill stub, then client -> decode stub (stream): the two
                     hops any P/D setup needs, done by the client itself
  proxy direct       client -> proxy (no prefill backends) -> decode stub
  proxy P/D          client -> proxy -> prefill stub, then -> decode stub
  naive P/D          the same through a plain FastAPI + httpx proxy (the "before")

Added latency = proxy P/D - client P/D and proxy direct - direct decode, per iteration
(paired), reported at p50/p99. Goal: <= 2 ms at p99.

    .venv/bin/python bench/proxy_overhead.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.workloads.stub_vllm import free_port  # noqa: E402

STUBS = """
import sys, threading, uvicorn
from tests.workloads.stub_vllm import create_stub_app
servers = []
for port in map(int, sys.argv[1:]):
    app, _ = create_stub_app(f"s{port}")
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                         access_log=False, loop="uvloop", http="httptools")
    servers.append(uvicorn.Server(cfg))
threads = [threading.Thread(target=s.run) for s in servers]
for t in threads: t.start()
for t in threads: t.join()
"""

# The straightforward FastAPI + httpx P/D proxy (what copack's proxy did before its hot path
# moved to httpcore and a lean ASGI relay): the "before" of the before/after, same run.
NAIVE_PROXY = """
import sys, httpx, orjson, uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
prefill, decode, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
app = FastAPI()
client = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100))
@app.post("/v1/completions")
async def completions(request: Request) -> Response:
    req = orjson.loads(await request.body())
    pre = dict(req, max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    r = await client.post(prefill + "/v1/completions", content=orjson.dumps(pre))
    req["kv_transfer_params"] = r.json().get("kv_transfer_params")
    up = await client.send(
        client.build_request("POST", decode + "/v1/completions", content=orjson.dumps(req)),
        stream=True,
    )
    async def relay():
        try:
            async for chunk in up.aiter_raw():
                yield chunk
        finally:
            await up.aclose()
    return StreamingResponse(relay(), media_type="text/event-stream")
@app.get("/health")
async def health() -> Response:
    return Response(b"ok")
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""

BODY = {"model": "m", "prompt": "hello", "max_tokens": 2, "stream": True}


def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def wait_up(client: httpx.Client, url: str, path: str = "/health") -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if client.get(url + path).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def ttft_stream(client: httpx.Client, url: str, body: dict) -> float:
    """Seconds from send to the first streamed byte (the whole stream is read)."""
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", url + "/v1/completions", content=orjson.dumps(body)) as r:
        for chunk in r.iter_raw():
            if first is None and chunk:
                first = time.perf_counter()
    assert r.status_code == 200 and first is not None
    return first - t0


def ttft_client_pd(client: httpx.Client, prefill: str, decode: str) -> float:
    t0 = time.perf_counter()
    pre = dict(BODY, max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    r = client.post(prefill + "/v1/completions", content=orjson.dumps(pre))
    kv = r.json()["kv_transfer_params"]
    first = None
    body = dict(BODY, kv_transfer_params=kv)
    with client.stream("POST", decode + "/v1/completions", content=orjson.dumps(body)) as s:
        for chunk in s.iter_raw():
            if first is None and chunk:
                first = time.perf_counter()
    assert first is not None
    return first - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to report load-independent cost."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(a: np.ndarray, p: float) -> float:
    return float(np.percentile(a, p)) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    args = ap.parse_args()

    p_port, d_port, proxy_port, direct_port, naive_port = (free_port() for _ in range(5))
    prefill, decode = f"http://127.0.0.1:{p_port}", f"http://127.0.0.1:{d_port}"
    proxy, proxy_direct = f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{direct_port}"
    naive = f"http://127.0.0.1:{naive_port}"
    copack = [sys.executable, "-m", "copack.cli", "workload", "proxy", "--host", "127.0.0.1"]
    procs = [
        spawn([sys.executable, "-c", STUBS, str(p_port), str(d_port)]),
        spawn([*copack, "--port", str(proxy_port), "--prefill", prefill, "--decode", decode]),
        spawn([*copack, "--port", str(direct_port), "--decode", decode]),
        spawn([sys.executable, "-c", NAIVE_PROXY, prefill, decode, str(naive_port)]),
    ]
    try:
        with httpx.Client(timeout=30, trust_env=False) as c:
            for url in (prefill, decode, proxy, proxy_direct, naive):
                wait_up(c, url)
            paths = {
                "direct decode": lambda: ttft_stream(c, decode, BODY),
                "client P/D": lambda: ttft_client_pd(c, prefill, decode),
                "proxy direct": lambda: ttft_stream(c, proxy_direct, BODY),
                "proxy P/D": lambda: ttft_stream(c, proxy, BODY),
                "naive P/D": lambda: ttft_stream(c, naive, BODY),
            }
            for _ in range(args.warmup):
                for f in paths.values():
                    f()
            samples: dict[str, list[float]] = {k: [] for k in paths}
            cpu0 = {p.pid: cpu_seconds(p.pid) for p in procs[1:]}
            for _ in range(args.requests):
                for k, f in paths.items():
                    samples[k].append(f())
            cpu_ms = {
                name: (cpu_seconds(p.pid) - cpu0[p.pid]) / args.requests * 1000
                for name, p in zip(
                    ("proxy P/D", "proxy direct", "naive P/D"), procs[1:], strict=True
                )
            }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)

    arr = {k: np.asarray(v) for k, v in samples.items()}
    print(f"proxy overhead: {args.requests} sequential streamed requests per path "
          f"(after {args.warmup} warm-up), stub backends on loopback, {os.cpu_count()} CPUs")
    print(f"{'path':<16}{'p50 ms':>10}{'p99 ms':>10}")
    for k, a in arr.items():
        print(f"{k:<16}{pct(a, 50):>10.3f}{pct(a, 99):>10.3f}")
    print("added by the proxy (paired per iteration):")
    for name, (a, b) in {
        "P/D": ("proxy P/D", "client P/D"),
        "passthrough": ("proxy direct", "direct decode"),
        "naive P/D": ("naive P/D", "client P/D"),
    }.items():
        d = arr[a] - arr[b]
        verdict = "meets" if pct(d, 99) <= 2.0 else "misses"
        print(
            f"  {name:<12} p50 {pct(d, 50):7.3f} ms   p99 {pct(d, 99):7.3f} ms   "
            f"({verdict} the 2 ms p99 goal)"
        )
    for name, ms in cpu_ms.items():
        print(f"  CPU time of the {name} proxy process: {ms:.3f} ms per request")
    ours = pct(arr["proxy P/D"] - arr["client P/D"], 50)
    theirs = pct(arr["naive P/D"] - arr["client P/D"], 50)
    print(
        "  copack vs naive P/D proxy: CPU per request x"
        f"{cpu_ms['proxy P/D'] / cpu_ms['naive P/D']:.2f}, added p50 x{ours / theirs:.2f}"
    )
    print(f"  load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
