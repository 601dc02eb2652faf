"""The proxy's hot path: parse a completions request, run prefill on a prefill backend, then
open decode and relay its answer. A mixin of `PDProxy`, apart from the app and lifecycle
wiring in `workloads.proxy`; it reads the pools, clients and metrics that `PDProxy` sets up."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpcore
import orjson
from fastapi import Request
from fastapi.responses import Response

from workloads.balancer import Backend, BackendPool, NoBackendError
from workloads.proxy_config import ProxyConfig
from workloads.proxy_errors import (
    ProxyError,
    UpstreamClientError,
    _error_response,
    _snippet,
    _waited,
)
from workloads.proxy_metrics import ProxyMetrics, _StreamStats
from workloads.proxy_relay import RelayResponse
from workloads.upstream import (
    UPSTREAM_ERRORS,
    Upstream,
    UpstreamError,
    content_type,
    upstream_error,
)


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


class PDFlow:
    """The prefill and decode steps of `PDProxy`, and the accounting of backend failures."""

    config: ProxyConfig
    prefill: BackendPool
    decode: BackendPool
    metrics: ProxyMetrics
    upstream: Upstream | None

    @staticmethod
    def _raw_headers(request: Request, request_id: str) -> list[tuple[bytes, bytes]]:
        out = [(b"x-request-id", request_id.encode("latin-1"))]
        for k, v in request.scope["headers"]:
            if k == b"authorization":
                out.append((k, v))
        return out

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
