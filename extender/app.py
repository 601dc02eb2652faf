"""The extender's HTTP service (FastAPI): the kube-scheduler verbs plus health, metrics and
debugging endpoints.

`create_app(state, config, binder)` starts nothing (no Kubernetes, no gRPC): `copack extender
serve` wires the watchers and telemetry around it, and the simulator drives it with a state fed
by hand and a binder of its own.

Every verb handler reads the raw body itself (no pydantic model on the hot path) and answers
with orjson bytes. Bad input is an HTTP 400 with `{"Error": "..."}` naming the problem; a state
that has not synced yet is a 503; nothing a client sends can produce a 500 or kill a worker."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from extender.binder import Binder
from extender.config import ExtenderConfig
from extender.metrics import ExtenderMetrics
from extender.protocol import BadRequest, error_body, parse_binding_args, parse_extender_args
from extender.scheduling import Scheduler
from extender.state import ClusterState

log = logging.getLogger("copack.extender")

JSON = "application/json"


def _json(body: bytes, status: int = 200) -> Response:
    return Response(content=body, status_code=status, media_type=JSON)


class _TooLarge(BadRequest):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(f"invalid Content-Length {declared!r}") from None
        if size > limit:
            raise _TooLarge(f"request body of {size} bytes exceeds the limit of {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(state: ClusterState, config: ExtenderConfig, binder: Binder | None) -> FastAPI:
    app = FastAPI(
        title="copack extender",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    scheduler = Scheduler(state, binder)
    metrics = ExtenderMetrics(state)
    limit = config.limits.max_body_bytes
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.cluster = state

    def _not_ready() -> Response | None:
        if state.synced:
            return None
        return _json(error_body("the extender's cluster state has not synced yet"), 503)

    def _bad(verb: str, t0: float, e: Exception) -> Response:
        metrics.observe(verb, time.perf_counter() - t0, "bad_request")
        return _json(error_body(f"{verb}: {e}"), 400)

    def _unexpected(verb: str, t0: float, e: Exception) -> Response:
        # Whatever went wrong, the scheduler must get an answer it can act on, not a 500.
        log.exception("%s failed", verb)
        metrics.observe(verb, time.perf_counter() - t0, "error")
        return _json(error_body(f"{verb}: cannot process the request: {type(e).__name__}: {e}"),
                     400)

    async def _verb(verb: str, request: Request, parse, handle) -> Response:
        """One envelope for the three verbs: parse, refuse while unsynced, answer 400 (never
        500) on anything wrong, and time every outcome."""
        t0 = time.perf_counter()
        try:
            args = parse(await _read_body(request, limit))
            if (r := _not_ready()) is not None:
                return r
            body, outcome = await handle(args)
        except BadRequest as e:
            return _bad(verb, t0, e)
        except Exception as e:
            return _unexpected(verb, t0, e)
        metrics.observe(verb, time.perf_counter() - t0, outcome)
        return _json(body)

    async def _filter(args):
        return scheduler.filter(args)

    async def _prioritize(args):
        return scheduler.prioritize(args)

    async def _bind(args):
        return await run_in_threadpool(scheduler.bind, args)

    @app.post("/filter")
    async def filter_(request: Request) -> Response:
        return await _verb("filter", request, parse_extender_args, _filter)

    @app.post("/prioritize")
    async def prioritize(request: Request) -> Response:
        return await _verb("prioritize", request, parse_extender_args, _prioritize)

    @app.post("/bind")
    async def bind(request: Request) -> Response:
        return await _verb("bind", request, parse_binding_args, _bind)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(content=b"ok", media_type="text/plain")

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.synced:
            return Response(content=b"ok", media_type="text/plain")
        return Response(content=b"cluster state not synced", status_code=503,
                        media_type="text/plain")

    @app.get("/metrics")
    async def metrics_() -> Response:
        return Response(content=metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/debug/state")
    async def debug_state(node: str | None = None) -> Response:
        """The whole view, or one node's part of it with `?node=NAME` (a 5,000-node dump is
        tens of MB and holds the state lock while it is built)."""
        return _json(orjson.dumps(state.to_dict(node), option=orjson.OPT_SERIALIZE_NUMPY))

    @app.get("/explain/{namespace}/{pod}")
    async def explain(namespace: str, pod: str) -> Response:
        out: dict[str, Any] | None = scheduler.explain(namespace, pod)
        if out is None:
            return _json(
                error_body(f"no decision recorded for {namespace}/{pod} (not seen by this "
                           "extender since it started, or evicted from its memory)"),
                404,
            )
        return _json(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY))

    return app
