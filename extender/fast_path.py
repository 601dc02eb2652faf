"""The three scheduler verbs as a bare ASGI layer in front of FastAPI.

The profile of the request path (docs/extender.md) put half of a filter+prioritize pair in the
HTTP/ASGI stack: starlette's routing, the Request and Response objects, FastAPI's dependency
solving. The verbs need none of it (raw body in, orjson bytes out), so `VerbFastPath` answers
`POST /filter`, `/prioritize` and `/bind` itself and hands every other request to the FastAPI
app untouched. The envelope is the one the verbs always had: body size limit, parse, 503 while
the state is unsynced, 400 (never 500) on anything wrong, every outcome timed."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from extender.metrics import ExtenderMetrics
from extender.protocol import BadRequest, error_body, parse_binding_args, parse_extender_args
from extender.scheduling import Scheduler

log = logging.getLogger("copack.extender")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

VERBS = {"/filter": "filter", "/prioritize": "prioritize", "/bind": "bind"}
_JSON_HEADERS = [(b"content-type", b"application/json")]


class _TooLarge(BadRequest):
    pass


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refused past `limit` bytes (declared or streamed)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                size = int(value)
            except ValueError:
                raise BadRequest(f"invalid Content-Length {value.decode('latin-1')!r}") from None
            if size > limit:
                raise _TooLarge(f"request body of {size} bytes exceeds the limit of {limit} bytes")
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("client disconnected before the body was complete")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _TooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _answer(send: Send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(headers or [])],
    })
    await send({"type": "http.response.body", "body": body})


class VerbFastPath:
    """ASGI middleware: the verbs here, everything else to `app`."""

    def __init__(
        self,
        app: ASGIApp,
        scheduler: Scheduler,
        metrics: ExtenderMetrics,
        limit: int,
        not_ready: Callable[[], bytes | None],
    ) -> None:
        self.app = app
        self.scheduler = scheduler
        self.metrics = metrics
        self.limit = limit
        self.not_ready = not_ready  # the 503 body while the extender may not answer, else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        verb = VERBS.get(scope["path"]) if scope["type"] == "http" else None
        if verb is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await _answer(send, 405, error_body(f"{verb}: only POST is allowed"),
                          [(b"allow", b"POST")])
            return
        t0 = time.perf_counter()
        metrics = self.metrics
        try:
            raw = await read_body(scope, receive, self.limit)
            if verb == "bind":
                bargs = parse_binding_args(raw)
            else:
                args = parse_extender_args(raw, self.scheduler.names)
            if (busy := self.not_ready()) is not None:
                await _answer(send, 503, busy)
                return
            if verb == "filter":
                body, outcome = self.scheduler.filter(args)
            elif verb == "prioritize":
                body, outcome = self.scheduler.prioritize(args)
            else:
                body, outcome = await run_in_threadpool(self.scheduler.bind, bargs)
        except BadRequest as e:
            metrics.observe(verb, time.perf_counter() - t0, "bad_request")
            await _answer(send, 400, error_body(f"{verb}: {e}"))
            return
        except Exception as e:
            # Whatever went wrong, the scheduler must get an answer it can act on, not a 500.
            log.exception("%s failed", verb)
            metrics.observe(verb, time.perf_counter() - t0, "error")
            await _answer(send, 400, error_body(
                f"{verb}: cannot process the request: {type(e).__name__}: {e}"))
            return
        metrics.observe(verb, time.perf_counter() - t0, outcome)
        await _answer(send, 200, body)
