"""The P/D proxy against stub vLLM servers, all real HTTP over loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.workloads.stub_vllm import ServerThread, StubState, create_stub_app, free_port
from workloads.balancer import BackendPool, normalize_url
from workloads.proxy import PDProxy, ProxyConfig


class Rig:
    def __init__(self, n_prefill: int, n_decode: int, **config: float) -> None:
        self.prefill: list[tuple[ServerThread, StubState]] = []
        self.decode: list[tuple[ServerThread, StubState]] = []
        for i in range(n_prefill):
            app, st = create_stub_app(f"p{i}")
            st.behaviour.engine_id = f"engine-p{i}"
            self.prefill.append((ServerThread(app).start(), st))
        for i in range(n_decode):
            app, st = create_stub_app(f"d{i}")
            self.decode.append((ServerThread(app).start(), st))
        cfg = ProxyConfig(
            prefill=[s.url for s, _ in self.prefill],
            decode=[s.url for s, _ in self.decode],
            **config,  # type: ignore[arg-type]
        )
        self.proxy = PDProxy(cfg)
        self.server = ServerThread(self.proxy.app).start()
        self.url = self.server.url
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        for s, _ in self.prefill + self.decode:
            s.stop()

    def metrics(self) -> str:
        return self.client.get("/metrics").text


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(1, 1)
    yield r
    r.close()


def sse_events(text: str) -> list[dict]:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            out.append(orjson.loads(block[6:]))
    return out


def test_non_streamed_completion_goes_prefill_then_decode(rig: Rig) -> None:
    r = rig.client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "xxx"
    (pre,) = rig.prefill[0][1].requests
    assert pre["max_tokens"] == 1 and pre["stream"] is False
    assert pre["kv_transfer_params"]["do_remote_decode"] is True
    (dec,) = rig.decode[0][1].requests
    assert dec["max_tokens"] == 3
    # The decode server gets exactly what prefill handed back.
    assert dec["kv_transfer_params"]["remote_engine_id"] == "engine-p0"
    assert dec["kv_transfer_params"]["remote_request_id"] == "p0-1"
    # One request id ties both halves together.
    rid = rig.prefill[0][1].headers[0]["x-request-id"]
    assert rid == rig.decode[0][1].headers[0]["x-request-id"]


def test_streamed_chat_is_relayed_and_timed(rig: Rig) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "max_completion_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with rig.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = sse_events(text)
    assert [e["choices"][0]["delta"]["content"] for e in events if e["choices"]] == ["x"] * 4
    assert text.rstrip().endswith("data: [DONE]")
    pre = rig.prefill[0][1].requests[0]
    assert pre["max_completion_tokens"] == 1 and "stream_options" not in pre
    m = rig.metrics()
    url = rig.decode[0][0].url
    assert f'copack_proxy_ttft_seconds_count{{backend="{url}"}} 1.0' in m
    assert f'copack_proxy_tpot_seconds_count{{backend="{url}"}} 1.0' in m
    assert 'copack_proxy_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in m


def test_without_prefill_backends_requests_go_straight_to_decode() -> None:
    r = Rig(0, 1)
    try:
        resp = r.client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 2})
        assert resp.status_code == 200
        (dec,) = r.decode[0][1].requests
        assert "kv_transfer_params" not in dec
        assert r.client.get("/health").json()["mode"] == "direct"
    finally:
        r.close()


def test_least_outstanding_balancing_spreads_concurrent_streams() -> None:
    r = Rig(2, 2)
    try:
        for _, st in r.decode:
            st.behaviour.token_delay_s = 0.05

        async def run() -> None:
            async with httpx.AsyncClient(base_url=r.url, timeout=30) as c:
                body = {"model": "m", "prompt": "a", "max_tokens": 6, "stream": True}
                rs = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))
                assert all(x.status_code == 200 for x in rs)

        asyncio.run(run())
        assert [len(st.requests) for _, st in r.decode] == [4, 4]
        assert sum(len(st.requests) for _, st in r.prefill) == 8
        health = r.client.get("/health").json()
        assert all(b["outstanding"] == 0 for b in health["prefill"] + health["decode"])
    finally:
        r.close()


@pytest.mark.parametrize("stream", [False, True])
def test_prefill_500_is_a_502_naming_the_backend(rig: Rig, stream: bool) -> None:
    rig.prefill[0][1].behaviour.mode = "error500"
    body = {"model": "m", "prompt": "a", "stream": stream}
    r = rig.client.post("/v1/completions", json=body)
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["backend"] == rig.prefill[0][0].url and "500" in err["message"]
    assert rig.decode[0][1].requests == []
    assert 'kind="http_5xx",role="prefill"' in rig.metrics().replace(
        f'backend="{rig.prefill[0][0].url}",', ""
    )


def test_backend_4xx_is_passed_through(rig: Rig) -> None:
    rig.prefill[0][1].behaviour.mode = "error400"
    r = rig.client.post("/v1/completions", json={"model": "m", "prompt": "a"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "prompt too long"


def test_decode_500_is_a_502(rig: Rig) -> None:
    rig.decode[0][1].behaviour.mode = "error500"
    r = rig.client.post("/v1/completions", json={"model": "m", "prompt": "a", "stream": True})
    assert r.status_code == 502
    assert r.json()["error"]["backend"] == rig.decode[0][0].url


def test_prefill_with_invalid_json_is_a_502(rig: Rig) -> None:
    rig.prefill[0][1].behaviour.mode = "garbage"
    r = rig.client.post("/v1/completions", json={"model": "m", "prompt": "a"})
    assert r.status_code == 502 and "invalid JSON" in r.json()["error"]["message"]


def test_hung_prefill_is_a_504_not_a_hung_client() -> None:
    r = Rig(1, 1, prefill_timeout_s=0.5)
    try:
        r.prefill[0][1].behaviour.mode = "hang"
        resp = r.client.post("/v1/completions", json={"model": "m", "prompt": "a"})
        assert resp.status_code == 504
        assert "timed out" in resp.json()["error"]["message"]
    finally:
        r.close()


def test_hung_decode_is_a_504() -> None:
    r = Rig(1, 1, decode_timeout_s=0.5)
    try:
        r.decode[0][1].behaviour.mode = "hang"
        body = {"model": "m", "prompt": "a", "stream": True}
        resp = r.client.post("/v1/completions", json=body)
        assert resp.status_code == 504
    finally:
        r.close()


def test_stream_cut_midway_ends_with_an_error_event(rig: Rig) -> None:
    rig.decode[0][1].behaviour.mode = "cut"
    body = {"model": "m", "prompt": "a", "max_tokens": 5, "stream": True}
    with rig.client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        text = r.read().decode()
    events = sse_events(text)
    assert events[0]["choices"][0]["text"] == "x"
    assert events[-1]["error"]["code"] == 502
    assert "broke off" in events[-1]["error"]["message"]


def test_dead_prefill_backend_is_skipped_for_a_live_one() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    r = Rig(1, 1)
    try:
        r.proxy.prefill.set_urls([dead, r.prefill[0][0].url])
        for _ in range(4):
            resp = r.client.post("/v1/completions", json={"model": "m", "prompt": "a"})
            assert resp.status_code == 200, resp.text
        health = r.client.get("/health").json()
        by_url = {b["url"]: b for b in health["prefill"]}
        assert by_url[dead]["available"] is False and by_url[dead]["failures"] >= 1
        assert len(r.prefill[0][1].requests) == 4
    finally:
        r.close()


def test_all_backends_dead_is_a_502_and_unhealthy() -> None:
    cfg = ProxyConfig(
        prefill=[f"127.0.0.1:{free_port()}"], decode=[f"127.0.0.1:{free_port()}"]
    )
    server = ServerThread(PDProxy(cfg).app).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/completions", json={"model": "m", "prompt": "a"})
            assert r.status_code == 502
            assert "prefill backend" in r.json()["error"]["message"]
            assert c.get("/health").status_code == 503
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"{nope", "not valid JSON"), (b"[1,2]", "JSON object"), (b'{"stream": "yes"}', "stream")],
)
def test_bad_request_bodies_are_400(rig: Rig, content: bytes, fragment: str) -> None:
    r = rig.client.post("/v1/completions", content=content)
    assert r.status_code == 400
    assert fragment in r.json()["error"]["message"]
    assert rig.prefill[0][1].requests == []


def test_models_and_tokenize_are_forwarded(rig: Rig) -> None:
    assert rig.client.get("/v1/models").json()["data"][0]["id"] == "stub-model"
    assert rig.client.post("/tokenize", json={"prompt": "a b c"}).json()["count"] == 6


def test_no_decode_backend_is_503() -> None:
    server = ServerThread(PDProxy(ProxyConfig()).app).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/completions", json={"model": "m", "prompt": "a"})
            assert r.status_code == 503
    finally:
        server.stop()


def test_pool_prefers_fewest_outstanding_and_rotates_ties() -> None:
    pool = BackendPool("decode")
    pool.set_urls(["a:1", "b:2", "c:3"])
    first = [pool.acquire() for _ in range(3)]
    assert len({b.url for b in first}) == 3
    pool.release(first[0], ok=True)
    assert pool.acquire() is first[0]


@pytest.mark.parametrize("bad", ["ftp://x:1", "http://", "http://h:port", ""])
def test_bad_backend_urls_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="backend URL"):
        normalize_url(bad)


def test_client_leaving_midstream_frees_the_decode_backend(rig: Rig) -> None:
    b = rig.decode[0][1].behaviour
    b.tokens, b.token_delay_s = 200, 0.05
    body = {"model": "m", "prompt": "a", "stream": True}
    with httpx.Client(base_url=rig.url, timeout=30) as c, c.stream(
        "POST", "/v1/completions", json=body
    ) as r:
        first = next(r.iter_raw())
        assert first.startswith(b"data: ")
    # The proxy notices at the next chunk, stops reading and releases the backend long
    # before the 200 tokens (10 s) would have been streamed.
    for _ in range(200):
        decode = rig.client.get("/health").json()["decode"][0]
        if decode["outstanding"] == 0:
            break
        time.sleep(0.02)
    assert decode["outstanding"] == 0
    assert decode["served"] == 0  # not counted as a completed answer


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "no decode backends"),
        (["--decode", "ftp://x"], "backend URL"),
        (["--decode", "h:1", "--decode-selector", "a=b"], "not both"),
        (["--decode", "h:1", "--prefill", "h:2", "--prefill-selector", "a=b"], "not both"),
        (["--decode", "h:1", "--prefill-timeout", "0"], "--prefill-timeout must be positive"),
    ],
)
def test_proxy_cli_refuses_bad_options(args: list[str], fragment: str) -> None:
    from typer.testing import CliRunner

    from copack.cli import app

    result = CliRunner().invoke(app, ["workload", "proxy", *args])
    assert result.exit_code == 2
    assert fragment in result.output and "Traceback" not in result.output


def test_simple_forward_of_a_failing_backend_is_a_json_502(rig: Rig) -> None:
    rig.prefill[0][1].behaviour.mode = "error500"
    r = rig.client.post("/tokenize", json={"prompt": "a"})
    assert r.status_code == 502
    assert "answered 500: tokenizer exploded" in r.json()["error"]["message"]
    rig.prefill[0][0].stop()
    r = rig.client.post("/tokenize", json={"prompt": "a"})
    assert r.status_code == 502
    assert r.json()["error"]["backend"] == rig.prefill[0][0].url


def test_backend_restart_does_not_fail_the_next_request(rig: Rig) -> None:
    """The proxy keeps connections alive; one the backend closed must be noticed (readable
    while idle) and replaced, not reused into a 502."""
    body = {"model": "m", "prompt": "a", "max_tokens": 2}
    assert rig.client.post("/v1/completions", json=body).status_code == 200
    for i, (server, _) in enumerate(rig.decode):
        server.stop()
        app, state = create_stub_app("d-restarted")
        rig.decode[i] = (ServerThread(app, port=server.port).start(), state)
    for _ in range(3):
        r = rig.client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
    assert len(rig.decode[0][1].requests) == 3


def test_backend_too_busy_to_accept_is_a_504_that_says_connecting() -> None:
    """A backend whose accept queue is full (a starved API server) drops new SYNs: the client
    must hear that the connect timeout ran out, not the decode timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue; nothing ever accepts
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.2)
    proxy = PDProxy(ProxyConfig(prefill=[], decode=[f"http://127.0.0.1:{port}"],
                                connect_timeout_s=0.3, decode_timeout_s=60))
    server = ServerThread(proxy.app).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            t0 = time.monotonic()
            r = c.post("/v1/completions", json={"model": "m", "prompt": "a"})
            waited = time.monotonic() - t0
        assert r.status_code == 504, r.text
        message = r.json()["error"]["message"]
        assert "after 0.3 s connecting" in message and "60 s" not in message
        assert waited < 30
    finally:
        server.stop()
        for s in fillers:
            s.close()
        listener.close()
