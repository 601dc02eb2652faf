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

This module wires the app (ASGI dispatch, FastAPI endpoints, lifespan). The parts live in
`proxy_config` (ProxyConfig), `proxy_flow` (the prefill/decode hot path), `proxy_relay` (the
streamed answer), `proxy_errors` (error answers) and `proxy_metrics` (Prometheus series);
their names are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from workloads.balancer import BackendPool, NoBackendError
from workloads.proxy_config import ProxyConfig as ProxyConfig
from workloads.proxy_errors import ProxyError as ProxyError
from workloads.proxy_errors import UpstreamClientError as UpstreamClientError
from workloads.proxy_errors import _describe as _describe
from workloads.proxy_errors import _error_response as _error_response
from workloads.proxy_errors import _snippet as _snippet
from workloads.proxy_errors import _waited as _waited
from workloads.proxy_flow import PDFlow
from workloads.proxy_flow import prefill_request as prefill_request
from workloads.proxy_metrics import _LATENCY_BUCKETS as _LATENCY_BUCKETS
from workloads.proxy_metrics import ProxyMetrics as ProxyMetrics
from workloads.proxy_metrics import _StreamStats as _StreamStats
from workloads.proxy_relay import RelayResponse as RelayResponse
from workloads.proxy_relay import _wait_disconnect as _wait_disconnect
from workloads.upstream import Upstream

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
_HOT_PATHS = frozenset({COMPLETIONS, CHAT_COMPLETIONS})
FORWARDED_HEADERS = ("authorization", "x-request-id")

log = logging.getLogger("copack.proxy")


class PDProxy(PDFlow):
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


class _HotPathApp:
    """ASGI 3 entry point (a class with async __call__: uvicorn takes a bound method for
    ASGI 2)."""

    def __init__(self, proxy: PDProxy) -> None:
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.proxy._asgi(scope, receive, send)


def create_app(config: ProxyConfig) -> ASGIApp:
    """A ready ASGI app for `config` (static backend lists)."""
    return PDProxy(config).app
