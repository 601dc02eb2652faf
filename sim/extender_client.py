"""Drives the real extender app the way kube-scheduler does: extender v1 JSON over HTTP.

The app runs in-process behind `httpx.ASGITransport`, so every verb goes through the
extender's real routing, request parsing, handlers and response encoding, without sockets or
threads (a simulated hour makes thousands of calls). `LoopbackExtenderClient` speaks the same
protocol to an extender listening on a real port, for checking the in-process path against it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import orjson


class ExtenderProtocolError(RuntimeError):
    """The extender answered something kube-scheduler could not use."""


class _Base:
    def __init__(self, *, node_cache_capable: bool = True, url_prefix: str = "") -> None:
        self.node_cache_capable = node_cache_capable
        self._prefix = url_prefix.rstrip("/")
        self.calls = {"filter": 0, "prioritize": 0, "bind": 0}

    def _args(self, pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]) -> dict:
        if self.node_cache_capable:
            return {"Pod": pod, "Nodes": None, "NodeNames": [n["metadata"]["name"] for n in nodes]}
        return {"Pod": pod, "Nodes": {"items": list(nodes)}, "NodeNames": None}

    def _post(self, verb: str, body: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def filter(
        self, pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]
    ) -> tuple[list[str], dict[str, str], str]:
        self.calls["filter"] += 1
        res = self._post("filter", self._args(pod, nodes))
        if not isinstance(res, dict):
            raise ExtenderProtocolError(f"filter answered {type(res).__name__}, not an object")
        if res.get("Error"):
            return [], {}, str(res["Error"])
        if self.node_cache_capable:
            names = list(res.get("NodeNames") or [])
        else:
            names = [n["metadata"]["name"] for n in (res.get("Nodes") or {}).get("items") or []]
        failed = dict(res.get("FailedNodes") or {})
        failed.update(res.get("FailedAndUnresolvableNodes") or {})
        return names, failed, ""

    def prioritize(
        self, pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]]
    ) -> dict[str, int]:
        self.calls["prioritize"] += 1
        res = self._post("prioritize", self._args(pod, nodes))
        if not isinstance(res, list):
            # kube-scheduler ignores a failed prioritize: the extender contributes nothing.
            return {}
        return {str(h["Host"]): int(h["Score"]) for h in res}

    def bind(self, pod: Mapping[str, Any], node: str) -> str:
        self.calls["bind"] += 1
        meta = pod["metadata"]
        res = self._post(
            "bind",
            {
                "PodName": meta["name"],
                "PodNamespace": meta.get("namespace", "default"),
                "PodUID": meta["uid"],
                "Node": node,
            },
        )
        if not isinstance(res, dict):
            raise ExtenderProtocolError(f"bind answered {type(res).__name__}, not an object")
        return str(res.get("Error") or "")


def _decode(verb: str, resp: httpx.Response) -> Any:
    if resp.status_code != 200:
        if verb == "prioritize":
            return None
        raise ExtenderProtocolError(f"{verb}: HTTP {resp.status_code}: {resp.text[:300]}")
    try:
        return orjson.loads(resp.content)
    except orjson.JSONDecodeError as e:
        raise ExtenderProtocolError(f"{verb}: answer is not JSON: {e}") from None


class AsgiExtenderClient(_Base):
    """The extender's ASGI app in this process, called through httpx's ASGI transport."""

    def __init__(self, app: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self._loop = asyncio.new_event_loop()
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://extender"
        )

    def _post(self, verb: str, body: Mapping[str, Any]) -> Any:
        async def go() -> httpx.Response:
            return await self._client.post(
                f"{self._prefix}/{verb}",
                content=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            )

        return _decode(verb, self._loop.run_until_complete(go()))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


class LoopbackExtenderClient(_Base):
    """An extender serving HTTP on a real address (e.g. uvicorn on 127.0.0.1)."""

    def __init__(self, base_url: str, **kw: Any) -> None:
        super().__init__(**kw)
        self._client = httpx.Client(base_url=base_url, timeout=5.0)

    def _post(self, verb: str, body: Mapping[str, Any]) -> Any:
        resp = self._client.post(
            f"{self._prefix}/{verb}",
            content=orjson.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        return _decode(verb, resp)

    def close(self) -> None:
        self._client.close()
