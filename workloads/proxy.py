"""The P/D proxy: one OpenAI-compatible endpoint in front of vLLM prefill and decode servers.

Request flow (as vLLM's NIXL proxy and llm-d's sidecar do it): the request goes to a prefill
server with `max_tokens=1`, `stream=false` and `kv_transfer_params={"do_remote_decode": true}`;
the `kv_transfer_params` of its answer (where the KV blocks wait) are put into the original
request, which goes to a decode server whose answer is streamed back unchanged. With no
prefill backends the proxy forwards straight to the decode (or mixed) servers.

Failures never leave a client hanging: every upstream step has a timeout, a backend that
fails or times out gives a JSON 502 or 504 naming it, and a stream cut off midway ends with an
SSE error event. A backend's own 4xx (a prompt too long, a bad parameter) is passed through:
that is the client's error, not the gateway's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Receive, Scope, Send

from workloads.balancer import Backend, BackendPool, NoBackendError
from workloads.upstream import (
    UPSTREAM_ERRORS,
    Upstream,
    UpstreamError,
    content_type,
    upstream_error,
)

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
_HOT_PATHS = frozenset({COMPLETIONS, CHAT_COMPLETIONS})
FORWARDED_HEADERS = ("authorization", "x-request-id")

log = logging.getLogger("copack.proxy")

# Latency buckets from 1 ms to 2 min: TTFT of a loaded server, TPOT of a fast one.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip


@dataclass
class ProxyConfig:
    """Backends and timeouts. Timeouts bound each upstream step so no client waits forever."""

    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 300.0  # a whole prefill answer (long prompts on a busy server)
    decode_timeout_s: float = 300.0  # until decode's first byte, and between streamed chunks
    cooldown_s: float = 5.0
    max_connections: int = 1024


class ProxyMetrics:
    """Prometheus series of the proxy, in a registry of its own (several apps per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "copack_proxy_requests",
            "Requests answered by the proxy, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "copack_proxy_ttft_seconds",
            "Time from the request's arrival to the first byte of a streamed answer",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "copack_proxy_tpot_seconds",
            "Mean time between output tokens of a streamed answer",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "copack_proxy_request_duration_seconds",
            "Time from the request's arrival to the end of its answer",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill = Histogram(
            "copack_proxy_prefill_seconds",
            "Duration of the prefill step on a prefill backend",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "copack_proxy_backend_errors",
            "Failed calls to a backend, by kind (connect, timeout, http_5xx, protocol, stream)",
            ["backend", "role", "kind"],
            registry=r,
        )
        self.outstanding = Gauge(
            "copack_proxy_backend_outstanding_requests",
            "Requests in flight on a backend",
            ["backend", "role"],
            registry=r,
        )


class ProxyError(Exception):
    """An upstream failure turned into a JSON error answer."""

    def __init__(self, status: int, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.backend = backend

    def body(self) -> bytes:
        kind = {502: "bad_gateway", 503: "service_unavailable", 504: "gateway_timeout"}.get(
            self.status, "invalid_request_error"
        )
        err: dict[str, Any] = {"message": self.message, "type": kind, "code": self.status}
        if self.backend:
            err["backend"] = self.backend
        return orjson.dumps({"error": err})


class UpstreamClientError(Exception):
    """A backend's own 4xx answer, passed through to the client as it came."""

    def __init__(self, status: int, content: bytes, content_type: str) -> None:
        super().__init__(status)
        self.status = status
        self.content = content
        self.content_type = content_type


def _error_response(err: ProxyError) -> Response:
    return Response(err.body(), status_code=err.status, media_type="application/json")


def prefill_request(req: dict[str, Any]) -> dict[str, Any]:
    """The request as sent to prefill: one token, no streaming, KV kept for a remote decode."""
    out = dict(req)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    return out


class _StreamStats:
    """Counts the SSE events of a streamed answer to time its tokens without re-encoding it."""

    __slots__ = ("events", "first_at", "tail", "usage_tokens")

    def __init__(self) -> None:
        self.events = 0
        self.first_at: float | None = None
        self.tail = b""
        self.usage_tokens: int | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        if self.first_at is None:
            self.first_at = now
        data = self.tail + chunk
        parts = data.split(b"\n\n")
        self.tail = parts.pop()
        for event in parts:
            if not event.startswith(b"data:") or event.startswith(b"data: [DONE]"):
                continue
            self.events += 1
            if b'"usage":{' in event:
                with contextlib.suppress(orjson.JSONDecodeError):
                    usage = orjson.loads(event[5:]).get("usage") or {}
                    tokens = usage.get("completion_tokens")
                    if isinstance(tokens, int):
                        self.usage_tokens = tokens

    def tpot(self, end: float) -> float | None:
        """Up to the stream's end, as `copack workload replay` and vLLM's benchmark count it,
        so the proxy's histogram and a client's report measure the same thing."""
        tokens = self.usage_tokens if self.usage_tokens is not None else self.events
        if self.first_at is None or tokens < 2:
            return None
        return (end - self.first_at) / (tokens - 1)


class PDProxy:
    """Holds the pools, the upstream clients and the metrics; `app` is the ASGI application
    (completions on a hot path, everything else through the FastAPI app `api`)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.prefill = BackendPool("prefill", cooldown_s=config.cooldown_s)
        self.decode = BackendPool("decode", cooldown_s=config.cooldown_s)
        self.prefill.set_urls(config.prefill)
        self.decode.set_urls(config.decode)
        self.metrics = ProxyMetrics()
        self.client: httpx.AsyncClient | None = None  # simple forwards (models, tokenize)
        self.upstream: Upstream | None = None  # the hot path: prefill and decode calls
        self._background: list[Callable[[], AsyncIterator[None]]] = []
        self.api = self._build_app()
        self.app: ASGIApp = _HotPathApp(self)

    # -- lifecycle ---------------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The completions endpoints are served here, ahead of FastAPI's routing, middleware
        and dependency machinery (a third of the proxy's CPU per request); the rest (health,
        metrics, models, tokenize, lifespan) goes to the FastAPI app."""
        path = scope.get("path")
        if scope["type"] != "http" or path not in _HOT_PATHS or scope.get("method") != "POST":
            await self.api(scope, receive, send)
            return
        try:
            response = await self.handle(Request(scope, receive), path)
        except Exception as e:  # a bug here must still answer, not drop the connection
            log.exception("proxy failure")
            response = _error_response(ProxyError(500, f"proxy error: {_describe(e)}"))
        await response(scope, receive, send)

    def add_background(self, factory: Callable[[], AsyncIterator[None]]) -> None:
        """Run an async generator (e.g. endpoint discovery) for the app's lifetime."""
        self._background.append(factory)

    def _new_client(self) -> httpx.AsyncClient:
        c = self.config
        return httpx.AsyncClient(
            timeout=httpx.Timeout(c.decode_timeout_s, connect=c.connect_timeout_s),
            limits=httpx.Limits(max_connections=c.max_connections),
            trust_env=False,
        )

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            self.client = self._new_client()
            self.upstream = Upstream(self.config.max_connections)
            tasks = [asyncio.create_task(self._drive(f)) for f in self._background]
            try:
                yield
            finally:
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
                await self.client.aclose()
                await self.upstream.aclose()

        app = FastAPI(title="copack P/D proxy", lifespan=lifespan, docs_url=None, redoc_url=None)

        @app.get("/health")
        async def health() -> Response:
            return self.health()

        @app.get("/metrics")
        async def metrics() -> Response:
            self._update_gauges()
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            return await self.forward_simple(request, "GET", "/v1/models", self.decode)

        @app.post("/tokenize")
        async def tokenize(request: Request) -> Response:
            pool = self.prefill if len(self.prefill) else self.decode
            return await self.forward_simple(request, "POST", "/tokenize", pool)

        return app

    @staticmethod
    async def _drive(factory: Callable[[], AsyncIterator[None]]) -> None:
        async for _ in factory():
            pass

    # -- endpoints ---------------------------------------------------------------------------

    def health(self) -> Response:
        prefill = self.prefill.snapshot()
        decode = self.decode.snapshot()
        now_ok = bool(decode) and any(b["available"] for b in decode)
        if prefill:
            now_ok = now_ok and any(b["available"] for b in prefill)
        body = {
            "status": "ok" if now_ok else "unavailable",
            "mode": "disaggregated" if prefill else "direct",
            "prefill": prefill,
            "decode": decode,
        }
        return Response(
            orjson.dumps(body), status_code=200 if now_ok else 503, media_type="application/json"
        )

    def _update_gauges(self) -> None:
        for pool in (self.prefill, self.decode):
            for b in pool.backends:
                self.metrics.outstanding.labels(b.url, b.role).set(b.outstanding)

    def _headers(self, request: Request, request_id: str) -> dict[str, str]:
        headers = {"content-type": "application/json", "x-request-id": request_id}
        auth = request.headers.get("authorization")
        if auth:
            headers["authorization"] = auth
        return headers

    @staticmethod
    def _raw_headers(request: Request, request_id: str) -> list[tuple[bytes, bytes]]:
        out = [(b"x-request-id", request_id.encode("latin-1"))]
        for k, v in request.scope["headers"]:
            if k == b"authorization":
                out.append((k, v))
        return out

    async def forward_simple(
        self, request: Request, method: str, path: str, pool: BackendPool
    ) -> Response:
        """Forward a small non-streamed call (model list, tokenize) to one backend."""
        assert self.client is not None
        body = await request.body() if method == "POST" else None
        try:
            backend = pool.acquire()
        except NoBackendError as e:
            return _error_response(ProxyError(503, str(e)))
        ok = False
        try:
            resp = await self.client.request(
                method,
                backend.url + path,
                content=body,
                headers=self._headers(request, request.headers.get("x-request-id") or "-"),
                timeout=httpx.Timeout(
                    self.config.prefill_timeout_s, connect=self.config.connect_timeout_s
                ),
            )
            ok = resp.status_code < 500
            if not ok:
                self._backend_error(pool, backend, "http_5xx")
                answer = _snippet(resp.content)
                msg = f"{backend.role} backend answered {resp.status_code}: {answer}"
                return _error_response(ProxyError(502, msg, backend=backend.url))
            return Response(
                resp.content,
                status_code=resp.status_code,
                media_type=resp.headers.get("content-type", "application/json"),
            )
        except httpx.TimeoutException:
            self._backend_error(pool, backend, "timeout")
            err = ProxyError(504, f"{backend.role} backend timed out", backend=backend.url)
            return _error_response(err)
        except httpx.TransportError as e:
            self._backend_error(pool, backend, "connect", down=True)
            msg = f"{backend.role} backend failed: {_describe(e)}"
            return _error_response(ProxyError(502, msg, backend=backend.url))
        finally:
            pool.release(backend, ok=ok)

    async def handle(self, request: Request, endpoint: str) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await self._handle(request, endpoint, started)
            status = response.status_code
            return response
        except ProxyError as e:
            status = e.status
            return _error_response(e)
        except UpstreamClientError as e:
            status = e.status
            return Response(e.content, status_code=e.status, media_type=e.content_type)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    async def _handle(self, request: Request, endpoint: str, started: float) -> Response:
        raw = await request.body()
        try:
            req = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ProxyError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(req, dict):
            raise ProxyError(400, "request body must be a JSON object")
        stream = req.get("stream", False)
        if not isinstance(stream, bool):
            raise ProxyError(400, "'stream' must be true or false")
        request_id = request.headers.get("x-request-id") or f"copack-{uuid.uuid4().hex}"
        headers = self._raw_headers(request, request_id)

        if len(self.prefill):
            kv_params = await self._prefill(endpoint, req, headers)
            if kv_params is not None:
                req = dict(req)
                req["kv_transfer_params"] = kv_params
        return await self._decode(endpoint, req, headers, request_id, stream, started)

    async def _prefill(
        self, endpoint: str, req: dict[str, Any], headers: list[tuple[bytes, bytes]]
    ) -> dict[str, Any] | None:
        """Run the prefill step; a refused connection is retried once on another backend."""
        assert self.upstream is not None
        body = orjson.dumps(prefill_request(req))
        cfg = self.config
        tried: Backend | None = None
        for attempt in range(2):
            try:
                backend = self.prefill.acquire(exclude=tried)
            except NoBackendError:
                if tried is None:
                    raise ProxyError(503, "no prefill backend available") from None
                raise ProxyError(
                    502, "prefill backend refused the connection", backend=tried.url
                ) from None
            t0 = time.perf_counter()
            ok = False
            try:
                status, ctype, content = await self.upstream.post(
                    backend.url,
                    endpoint,
                    body,
                    headers,
                    connect_s=cfg.connect_timeout_s,
                    read_s=cfg.prefill_timeout_s,
                )
                ok = status < 500
            except UpstreamError as e:
                self._backend_error(self.prefill, backend, e.kind, down=e.kind != "timeout")
                if e.kind == "connect" and attempt == 0 and len(self.prefill) > 1:
                    tried = backend
                    continue
                if e.kind == "timeout":
                    raise ProxyError(
                        504,
                        "prefill backend timed out after "
                        f"{_waited(e, cfg, cfg.prefill_timeout_s)} ({e})",
                        backend=backend.url,
                    ) from None
                raise ProxyError(502, f"prefill backend failed: {e}", backend=backend.url) from None
            finally:
                self.prefill.release(backend, ok=ok)
            self.metrics.prefill.labels(backend.url).observe(time.perf_counter() - t0)
            if 400 <= status < 500:
                raise UpstreamClientError(status, content, ctype.decode("latin-1"))
            if status >= 500:
                self.metrics.backend_errors.labels(backend.url, "prefill", "http_5xx").inc()
                raise ProxyError(
                    502,
                    f"prefill backend answered {status}: {_snippet(content)}",
                    backend=backend.url,
                )
            try:
                answer = orjson.loads(content)
            except orjson.JSONDecodeError:
                self.metrics.backend_errors.labels(backend.url, "prefill", "protocol").inc()
                raise ProxyError(
                    502, "prefill backend answered with invalid JSON", backend=backend.url
                ) from None
            params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
            return params if isinstance(params, dict) else None
        raise AssertionError("unreachable")  # pragma: no cover

    def _backend_error(
        self, pool: BackendPool, backend: Backend, kind: str, *, down: bool = False
    ) -> None:
        self.metrics.backend_errors.labels(backend.url, backend.role, kind).inc()
        if down:
            pool.mark_down(backend)

    async def _decode(
        self,
        endpoint: str,
        req: dict[str, Any],
        headers: list[tuple[bytes, bytes]],
        request_id: str,
        stream: bool,
        started: float,
    ) -> Response:
        assert self.upstream is not None
        cfg = self.config
        try:
            backend = self.decode.acquire()
        except NoBackendError:
            raise ProxyError(503, "no decode backend available") from None
        released = False

        def release(ok: bool) -> None:
            nonlocal released
            if not released:
                released = True
                self.decode.release(backend, ok=ok)

        try:
            upstream = await self.upstream.open(
                backend.url,
                endpoint,
                orjson.dumps(req),
                headers,
                connect_s=cfg.connect_timeout_s,
                read_s=cfg.decode_timeout_s,
            )
        except UpstreamError as e:
            release(False)
            self._backend_error(self.decode, backend, e.kind, down=e.kind != "timeout")
            if e.kind == "timeout":
                raise ProxyError(
                    504,
                    f"decode backend timed out after {_waited(e, cfg, cfg.decode_timeout_s)} ({e})",
                    backend=backend.url,
                ) from None
            raise ProxyError(502, f"decode backend failed: {e}", backend=backend.url) from None
        except BaseException:
            release(False)
            raise

        status = upstream.status
        ctype = content_type(upstream, b"text/event-stream" if stream else b"application/json")
        if status >= 400 or not stream:
            ok = False
            try:
                content = await upstream.aread()
                ok = status < 500
            except UPSTREAM_ERRORS as exc:
                e = upstream_error(exc)
                self._backend_error(self.decode, backend, e.kind, down=e.kind != "timeout")
                code = 504 if e.kind == "timeout" else 502
                raise ProxyError(code, f"decode backend failed: {e}", backend=backend.url) from None
            finally:
                await upstream.aclose()
                release(ok)
            if status >= 500:
                self.metrics.backend_errors.labels(backend.url, "decode", "http_5xx").inc()
                raise ProxyError(
                    502,
                    f"decode backend answered {status}: {_snippet(content)}",
                    backend=backend.url,
                )
            self.metrics.e2e.labels(endpoint).observe(time.perf_counter() - started)
            return Response(content, status_code=status, media_type=ctype.decode("latin-1"))

        return RelayResponse(
            self._relay(upstream, backend, release, endpoint, started),
            [(b"content-type", ctype), (b"x-request-id", request_id.encode("latin-1"))],
        )

    async def _relay(
        self,
        upstream: httpcore.Response,
        backend: Backend,
        release: Callable[[bool], None],
        endpoint: str,
        started: float,
    ) -> AsyncIterator[bytes]:
        """Pass the decode stream through, timing its tokens; a cut stream ends with an error."""
        stats = _StreamStats()
        ok = False
        try:
            async for chunk in upstream.aiter_stream():
                if chunk:
                    stats.feed(chunk, time.perf_counter())
                    yield chunk
            ok = True
        except UPSTREAM_ERRORS as exc:
            e = upstream_error(exc)
            kind = "timeout" if e.kind == "timeout" else "stream"
            self._backend_error(self.decode, backend, kind)
            err = ProxyError(
                504 if kind == "timeout" else 502,
                f"decode stream broke off: {e}",
                backend=backend.url,
            )
            yield b"data: " + err.body() + b"\n\n"
        finally:
            await upstream.aclose()
            release(ok)
            if stats.first_at is not None:
                self.metrics.ttft.labels(backend.url).observe(stats.first_at - started)
            end = time.perf_counter()
            tpot = stats.tpot(end)
            if tpot is not None:
                self.metrics.tpot.labels(backend.url).observe(tpot)
            self.metrics.e2e.labels(endpoint).observe(end - started)


class _HotPathApp:
    """ASGI 3 entry point (a class with async __call__: uvicorn takes a bound method for
    ASGI 2)."""

    def __init__(self, proxy: PDProxy) -> None:
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.proxy._asgi(scope, receive, send)


class RelayResponse:
    """An ASGI response streaming chunks as they come, with less machinery than Starlette's
    StreamingResponse: no task group per request, just one waiter on `receive` that notices
    the client leaving, so the upstream stream is closed and the decode server freed."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], headers: list[tuple[bytes, bytes]]):
        self.chunks = chunks
        self.headers = headers
        self.status_code = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for chunk in self.chunks:
                if gone.done():
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            await self.chunks.aclose()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _waited(e: UpstreamError, cfg: ProxyConfig, read_s: float) -> str:
    """The limit that ran out: a backend too busy to accept a connection is not a slow answer."""
    if e.connecting:
        return f"{cfg.connect_timeout_s:g} s connecting"
    return f"{read_s:g} s"


def _snippet(content: bytes, limit: int = 300) -> str:
    text = content.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "…"


def create_app(config: ProxyConfig) -> ASGIApp:
    """A ready ASGI app for `config` (static backend lists)."""
    return PDProxy(config).app
