"""A stand-in for a vLLM OpenAI server, served for real over loopback HTTP by uvicorn.

It speaks the parts of the API the proxy and the load generator use (completions and chat,
streamed or not, `kv_transfer_params` on prefill, /health, /v1/models, /tokenize) and can be
told to fail in the ways real backends fail: answer 500, answer 400, hang, or cut a stream.
Used by the proxy tests and by bench/proxy_overhead.py; the real vLLM is used by the e2e test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse


@dataclass
class StubBehaviour:
    """What the stub does next; tests change it between requests."""

    mode: str = "ok"  # ok | error500 | error400 | hang | cut | garbage
    tokens: int = 4  # streamed chunks when max_tokens is absent
    token_delay_s: float = 0.0
    first_token_delay_s: float = 0.0
    engine_id: str = "stub-engine"


@dataclass
class StubState:
    behaviour: StubBehaviour = field(default_factory=StubBehaviour)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def _chunk(rid: str, chat: bool, text: str, finish: str | None) -> bytes:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        obj = "text_completion"
    return b"data: " + orjson.dumps({"id": rid, "object": obj, "choices": [choice]}) + b"\n\n"


def create_stub_app(name: str, state: StubState | None = None) -> tuple[FastAPI, StubState]:
    st = state or StubState()
    app = FastAPI()
    counter = {"n": 0}

    async def complete(request: Request, chat: bool) -> Response:
        body = orjson.loads(await request.body())
        st.requests.append(body)
        st.headers.append(dict(request.headers))
        b = st.behaviour
        if b.mode == "error500":
            return Response(b'{"error":"boom"}', status_code=500, media_type="application/json")
        if b.mode == "error400":
            msg = orjson.dumps({"error": {"message": "prompt too long", "code": 400}})
            return Response(msg, status_code=400, media_type="application/json")
        if b.mode == "hang":
            await asyncio.sleep(3600)
        if b.mode == "garbage":
            return Response(b"<html>not json", media_type="application/json")
        counter["n"] += 1
        rid = f"{name}-{counter['n']}"
        n = int(body.get("max_tokens") or b.tokens)
        usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
        kv = body.get("kv_transfer_params")
        kv_out = None
        if isinstance(kv, dict) and kv.get("do_remote_decode"):
            kv_out = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_engine_id": b.engine_id,
                "remote_request_id": rid,
                "remote_block_ids": [[1, 2]],
                "remote_host": "127.0.0.1",
                "remote_port": 5600,
            }
        if not body.get("stream"):
            await asyncio.sleep(b.first_token_delay_s + b.token_delay_s * max(0, n - 1))
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": "x" * n},
                    "finish_reason": "length",
                }
            else:
                choice = {"index": 0, "text": "x" * n, "finish_reason": "length"}
            answer = {"id": rid, "choices": [choice], "usage": usage, "kv_transfer_params": kv_out}
            return Response(orjson.dumps(answer), media_type="application/json")

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            st.in_flight += 1  # streams in progress, for concurrency checks
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
            try:
                await asyncio.sleep(b.first_token_delay_s)
                for i in range(n):
                    if i:
                        await asyncio.sleep(b.token_delay_s)
                    if b.mode == "cut" and i == 1:
                        raise RuntimeError("stub cuts the stream")
                    yield _chunk(rid, chat, "x", "length" if i == n - 1 else None)
                if include_usage:
                    usage_event = {"id": rid, "choices": [], "usage": usage}
                    yield b"data: " + orjson.dumps(usage_event) + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                st.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.get("/health")
    async def health() -> Response:
        return Response(b"")

    @app.get("/v1/models")
    async def models() -> Response:
        return Response(orjson.dumps({"object": "list", "data": [{"id": "stub-model"}]}))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        if st.behaviour.mode == "error500":
            return Response(b"tokenizer exploded", status_code=500)
        body = orjson.loads(await request.body())
        words = str(body.get("prompt", "")).split()
        # Two tokens per word: lets tests see that calibration uses the server's count.
        return Response(orjson.dumps({"count": 2 * len(words), "max_model_len": 4096}))

    return app, st


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """Runs an ASGI app under uvicorn on a loopback port in a daemon thread."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def stub_backends(count: int, name: str) -> Iterator[list[tuple[ServerThread, StubState]]]:
    servers: list[tuple[ServerThread, StubState]] = []
    try:
        for i in range(count):
            app, state = create_stub_app(f"{name}{i}")
            servers.append((ServerThread(app).start(), state))
        yield servers
    finally:
        for server, _ in servers:
            server.stop()
