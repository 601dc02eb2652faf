"""The lean ASGI response that relays a decode stream to the client, and notices the client
leaving so the upstream stream is closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from starlette.types import Receive, Scope, Send


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
