"""The proxy's HTTP client to its backends: httpcore (httpx's engine), requests in one write.

httpcore writes an HTTP/1.1 request as two socket writes (headers, then body); each is a
syscall and, on loopback, a wake-up of the receiving process, which on a small shared VM is
where a proxy's latency goes. Here writes are held until the connection next reads (an
HTTP/1.1 client always reads the answer after sending the request) and go out as one write.
"""

from __future__ import annotations

import select
import socket
import typing

import httpcore
import httpx


def _socket_readable(sock: socket.socket | None) -> bool:
    """True when a read would not block: on an idle keep-alive connection that means the
    server closed it (or sent stray bytes), so httpcore must not reuse it."""
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _CoalescingStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._pending: list[bytes] = []
        self._pending_timeout: float | None = None
        # Looked up once: httpcore asks "is_readable" before every reuse of a connection and
        # anyio's typed-attribute lookup of the socket costs more than the poll itself.
        self._socket: socket.socket | None = inner.get_extra_info("socket")

    async def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            await self._inner.write(data, self._pending_timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._pending.append(bytes(buffer))
        self._pending_timeout = timeout

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self._flush()
        return await self._inner.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self._pending.clear()
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: typing.Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        await self._flush()
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _CoalescingStream(tls)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable" and self._socket is not None:
            return _socket_readable(self._socket)
        return self._inner.get_extra_info(info)


class CoalescingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's asyncio backend whose streams send each request in one write."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _CoalescingStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return _CoalescingStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class UpstreamError(Exception):
    """A failed call to a backend: `kind` is connect, timeout or protocol."""

    def __init__(self, kind: str, message: str, *, connecting: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.connecting = connecting  # a timeout while connecting, not while reading


def upstream_error(e: Exception) -> UpstreamError:
    """Classify an httpcore exception (timeouts first: ConnectTimeout is also a timeout)."""
    text = str(e).strip()
    message = f"{type(e).__name__}: {text}" if text else type(e).__name__
    if isinstance(e, httpcore.TimeoutException):
        return UpstreamError("timeout", message, connecting=isinstance(e, httpcore.ConnectTimeout))
    if isinstance(e, httpcore.ConnectError):
        return UpstreamError("connect", message)
    return UpstreamError("protocol", message)


UPSTREAM_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException)


class Upstream:
    """The hot path to the backends on httpcore (httpx's engine) directly.

    httpx's request/response models, URL parsing and header normalisation cost more CPU per
    request than the proxy's own work; the two calls of every P/D request skip them and send
    prebuilt URLs and headers through a coalescing connection pool.
    """

    def __init__(self, max_connections: int) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            network_backend=CoalescingBackend(),
        )
        self._urls: dict[tuple[str, str], tuple[httpcore.URL, bytes]] = {}

    def _url(self, base: str, path: str) -> tuple[httpcore.URL, bytes]:
        key = (base, path)
        hit = self._urls.get(key)
        if hit is None:
            parsed = httpx.URL(base + path)
            url = httpcore.URL(
                scheme=parsed.raw_scheme,
                host=parsed.raw_host,
                port=parsed.port,
                target=parsed.raw_path,
            )
            hit = (url, parsed.netloc)
            if len(self._urls) > 4096:  # backends come and go under discovery
                self._urls.clear()
            self._urls[key] = hit
        return hit

    def _request(
        self,
        base: str,
        path: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        connect_s: float,
        read_s: float,
    ) -> httpcore.Request:
        url, host = self._url(base, path)
        all_headers = [
            (b"host", host),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ]
        timeouts = {"connect": connect_s, "read": read_s, "write": read_s, "pool": connect_s}
        return httpcore.Request(
            b"POST", url, headers=all_headers, content=body, extensions={"timeout": timeouts}
        )

    async def open(
        self,
        base: str,
        path: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        connect_s: float,
        read_s: float,
    ) -> httpcore.Response:
        """Send a POST and return once the answer's headers are in; the caller reads the
        body (`aiter_stream`/`aread`) and must `aclose` it. Raises UpstreamError."""
        request = self._request(base, path, body, headers, connect_s, read_s)
        try:
            return await self._pool.handle_async_request(request)
        except UPSTREAM_ERRORS as e:
            raise upstream_error(e) from None

    async def post(
        self,
        base: str,
        path: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        connect_s: float,
        read_s: float,
    ) -> tuple[int, bytes, bytes]:
        """POST and read the whole answer: (status, content-type, body). Raises UpstreamError."""
        response = await self.open(base, path, body, headers, connect_s=connect_s, read_s=read_s)
        try:
            content = await response.aread()
        except UPSTREAM_ERRORS as e:
            raise upstream_error(e) from None
        finally:
            await response.aclose()
        return response.status, content_type(response), content

    async def aclose(self) -> None:
        await self._pool.aclose()


def content_type(response: httpcore.Response, default: bytes = b"application/json") -> bytes:
    for k, v in response.headers:
        if k.lower() == b"content-type":
            return v
    return default
