"""How the P/D proxy turns upstream failures into answers: a JSON 502/503/504 naming the
backend, or a backend's own 4xx passed through, plus the wording of those messages."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

from workloads.proxy_config import ProxyConfig
from workloads.upstream import UpstreamError


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
