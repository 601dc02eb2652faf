"""Least-outstanding-requests choice among the proxy's prefill and decode backends.

The proxy counts the requests it has in flight on each backend and sends the next one to the
backend with the fewest, which tracks real load on LLM servers (long prompts and long outputs
hold a backend for very different times) better than round-robin does. Ties rotate, so idle
backends share the work evenly. A backend that refused a connection is set aside for a short
cool-down instead of being tried again at once by every request.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_COOLDOWN_S = 5.0


class NoBackendError(RuntimeError):
    """No backend of the needed role is configured or discovered."""


def normalize_url(url: str) -> str:
    """`host:port` or `http://host:port/` becomes `http://host:port`; bad URLs are refused."""
    raw = url.strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"backend URL {url!r} is not http(s)://host[:port]")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as e:
        raise ValueError(f"backend URL {url!r} has a bad port") from e
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


@dataclass(eq=False)
class Backend:
    """One vLLM server as the proxy sees it."""

    url: str
    role: str
    outstanding: int = 0
    down_until: float = 0.0
    served: int = 0
    failures: int = 0

    def available(self, now: float) -> bool:
        return now >= self.down_until


@dataclass
class BackendPool:
    """The backends of one role; `acquire`/`release` bracket each request sent to one."""

    role: str
    cooldown_s: float = DEFAULT_COOLDOWN_S
    _backends: dict[str, Backend] = field(default_factory=dict)
    _next: int = 0

    def set_urls(self, urls: Iterable[str]) -> None:
        """Replace the set of backends, keeping the counters of those that stay."""
        wanted = [normalize_url(u) for u in urls]
        self._backends = {u: self._backends.get(u) or Backend(u, self.role) for u in wanted}

    @property
    def backends(self) -> list[Backend]:
        return list(self._backends.values())

    def __len__(self) -> int:
        return len(self._backends)

    def acquire(self, exclude: Backend | None = None) -> Backend:
        """The backend with the fewest requests in flight, counted as one more in flight.

        Backends cooling down after a failure are used only when no other is left.
        """
        candidates = [b for b in self._backends.values() if b is not exclude]
        if not candidates:
            raise NoBackendError(f"no {self.role} backend available")
        now = time.monotonic()
        healthy = [b for b in candidates if b.available(now)] or candidates
        n = len(healthy)
        start = self._next % n
        self._next += 1
        best = healthy[start]
        for i in range(1, n):
            b = healthy[(start + i) % n]
            if b.outstanding < best.outstanding:
                best = b
        best.outstanding += 1
        return best

    def release(self, backend: Backend, *, ok: bool) -> None:
        backend.outstanding = max(0, backend.outstanding - 1)
        if ok:
            backend.served += 1
            backend.down_until = 0.0
        else:
            backend.failures += 1

    def mark_down(self, backend: Backend) -> None:
        """Set a backend aside after it refused a connection or failed outright."""
        backend.down_until = time.monotonic() + self.cooldown_s

    def snapshot(self) -> list[dict[str, object]]:
        now = time.monotonic()
        return [
            {
                "url": b.url,
                "role": b.role,
                "outstanding": b.outstanding,
                "served": b.served,
                "failures": b.failures,
                "available": b.available(now),
            }
            for b in self._backends.values()
        ]
