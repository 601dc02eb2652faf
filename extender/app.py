"""The extender's HTTP service (FastAPI): the kube-scheduler verbs plus health, metrics and
debugging endpoints.

`create_app(state, config, binder)` starts nothing (no Kubernetes, no gRPC): `copack extender
serve` wires the watchers and telemetry around it, and the simulator drives it with a state fed
by hand and a binder of its own.

The verbs are answered by a bare ASGI layer in front of FastAPI (extender/fast_path.py): raw
body in, orjson bytes out, no routing or pydantic on the hot path.
Bad input is an HTTP 400 with `{"Error": "..."}` naming the problem; a state
that has not synced yet is a 503; nothing a client sends can produce a 500 or kill a worker."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.responses import Response

from extender.binder import Binder
from extender.config import ExtenderConfig
from extender.fast_path import VerbFastPath
from extender.leader import Leadership
from extender.metrics import ExtenderMetrics
from extender.protocol import error_body
from extender.scheduling import Scheduler
from extender.state import ClusterState

log = logging.getLogger("copack.extender")

JSON = "application/json"


def _json(body: bytes, status: int = 200) -> Response:
    return Response(content=body, status_code=status, media_type=JSON)


def create_app(
    state: ClusterState,
    config: ExtenderConfig,
    binder: Binder | None,
    leadership: Leadership | None = None,
) -> FastAPI:
    """`leadership` None: this replica always answers (no leader election)."""
    app = FastAPI(
        title="copack extender",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    scheduler = Scheduler(state, binder)
    metrics = ExtenderMetrics(state, leadership.is_leader if leadership else None)
    limit = config.limits.max_body_bytes
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.cluster = state

    def _not_ready() -> bytes | None:
        """The 503 body for the verbs while they may not be answered, else None."""
        if not state.synced:
            return error_body("the extender's cluster state has not synced yet")
        if leadership is not None and not leadership.is_leader():
            return error_body(leadership.standby_reason())
        return None

    # the verbs bypass FastAPI's routing and request objects (extender/fast_path.py)
    app.add_middleware(VerbFastPath, scheduler=scheduler, metrics=metrics, limit=limit,
                       not_ready=_not_ready)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(content=b"ok", media_type="text/plain")

    @app.get("/readyz")
    async def readyz() -> Response:
        if not state.synced:
            return Response(content=b"cluster state not synced", status_code=503,
                            media_type="text/plain")
        # Ready = warm (synced), standby included, so a PodDisruptionBudget counts every
        # replica; the Service reaches the leader by its copack.io/extender-role label.
        if leadership is not None and not leadership.is_leader():
            return Response(content=f"ok; {leadership.standby_reason()}".encode(),
                            media_type="text/plain")
        return Response(content=b"ok", media_type="text/plain")

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
