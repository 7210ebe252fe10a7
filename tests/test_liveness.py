"""Nothing waits forever on a peer that stopped: a hung child, a client that stalls.

* A llama-server that stops answering (SIGSTOP, a deadlock) ends its requests with a 502
  or an in-band error and is killed and replaced; an answer that goes silent is cut at
  ``timeouts.first_byte`` / ``timeouts.upstream_idle``.
* A client that sends its headers and then stalls gets 408 at ``timeouts.body``, and all
  the bodies still arriving share one memory budget (``security.max_pending_bodies``).
* A client that stops reading its answer gives its lease back: at once when it closes or
  half-closes, within ``timeouts.send`` when it just stops.

Timing logic runs on the fake clock (``BodyReader`` here, the health probe in
``test_supervisor.py``, the upstream deadlines in ``test_upstream.py``); the end-to-end
tests use short configured deadlines and assert outcomes, never elapsed times.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing

from swapd.config import parse_config
from swapd.http.fastpath import BodyReader, RequestError
from swapd.serve import Running, open_server
from tests.support.rawhttp import error_code
from tests.test_api import chat, config_text, sse_events, swapd


@contextlib.asynccontextmanager
async def swapd_with_profiles(tmp_path: Path, profiles: dict[str, dict[str, Any]],
                              **kwargs: Any) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    """``test_api.swapd`` with more settings in some profiles."""
    data = json.loads(config_text(tmp_path, **kwargs))
    for name, settings in profiles.items():
        data["profiles"][name].update(settings)
    config = parse_config(json.dumps(data), base_dir=tmp_path)
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=30) as client:
        yield running, client

# -- request bodies -------------------------------------------------------------------


def reader_config(tmp_path: Path, **security: Any) -> Any:
    text = json.dumps({"state_dir": str(tmp_path), "timeouts": {"body": "30s"},
                       "security": security, "profiles": {"a": {"model": "a.gguf"}}})
    return parse_config(text, base_dir=tmp_path)


class Client:
    """The body side of one client connection, fed by the test."""

    def __init__(self) -> None:
        self.declared_length: int | None = None
        self.send, self.receive_channel = trio.open_memory_channel[bytes | None](10)

    @property
    def body_arrived(self) -> bool:
        return False  # every part comes from the test, when it says

    def whole_body(self) -> bytes | None:
        return None

    def declaring(self, length: int | None) -> Client:
        self.declared_length = length
        return self

    async def continue_if_asked(self) -> None:
        pass

    async def next_body_part(self) -> bytes | None:
        return await self.receive_channel.receive()

    async def part(self, data: bytes, more: bool = True) -> None:
        await self.send.send(data)
        if not more:
            await self.send.send(b"")


async def test_body_reader_deadline_and_shared_budget(tmp_path: Path,
                                                      autojump_clock: Any) -> None:
    config = reader_config(tmp_path, max_body="1KiB", max_pending_bodies="2KiB")
    bodies = BodyReader(lambda: config)

    # A body that stalls after its first bytes: 408 at timeouts.body, budget given back.
    stalled = Client()
    await stalled.part(b"x" * 100)
    began = trio.current_time()
    with pytest.raises(RequestError) as caught:
        await bodies.read(stalled.declaring(1000))
    assert caught.value.status == 408 and caught.value.code == "body_timeout"
    assert "timeouts.body" in str(caught.value)
    assert trio.current_time() - began == pytest.approx(30)
    assert bodies.pending == 0

    # Two declared bodies of 1000 bytes take the 2KiB budget while they arrive; a third
    # is refused at once with 503 and Retry-After, before any of it is read.
    results: list[bytes | None] = []
    slow = [Client(), Client()]
    async with trio.open_nursery() as nursery:
        for client in slow:
            nursery.start_soon(
                lambda c: _append(results, bodies.read(c.declaring(1000))), client)
        await trio.testing.wait_all_tasks_blocked()
        assert bodies.pending == 2000
        with pytest.raises(RequestError) as caught:
            await bodies.read(Client().declaring(100))
        assert caught.value.status == 503 and caught.value.retry_after == 1
        assert trio.current_time() == began + 30  # at once
        for client in slow:
            await client.part(b"y" * 1000, more=False)
    assert results == [b"y" * 1000] * 2
    assert bodies.pending == 0  # complete bodies no longer count

    # A chunked body (no Content-Length) reserves as it grows, and is refused when it
    # passes max_body; a declared one too large is refused before it is read.
    chunked = Client()
    await chunked.part(b"z" * 600)
    await chunked.part(b"z" * 600)
    with pytest.raises(RequestError) as caught:
        await bodies.read(chunked.declaring(None))
    assert caught.value.status == 413
    with pytest.raises(RequestError) as caught:
        await bodies.read(Client().declaring(5000))
    assert caught.value.status == 413
    assert bodies.pending == 0

    # The client leaving mid-body: None, and its reservation is returned.
    leaving = Client()
    await leaving.part(b"x" * 10)
    await leaving.send.send(None)
    assert await bodies.read(leaving.declaring(1000)) is None
    assert bodies.pending == 0


async def _append(results: list[bytes | None], read: Any) -> None:
    results.append(await read)


def test_max_pending_bodies_must_hold_one_body(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="must be at least max_body"):
        reader_config(tmp_path, max_body="1MiB", max_pending_bodies="512KiB")
    config = reader_config(tmp_path, max_body="1MiB")
    assert config.security.pending_bodies_limit == 2 * 2**20  # the default: two bodies


async def open_client(running: Running, *, rcvbuf: int | None = None) -> trio.SocketStream:
    host, port = running.url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    if rcvbuf is not None:  # before connect, so the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((host, int(port)))
    return trio.SocketStream(sock)


async def send_head(stream: trio.SocketStream, path: str, body: bytes, *,
                    declared: int | None = None) -> h11.Connection:
    """Send a POST's head and ``body``; ``declared`` > len(body) leaves it unfinished."""
    conn = h11.Connection(h11.CLIENT)
    length = len(body) if declared is None else declared
    data = conn.send(h11.Request(method="POST", target=path, headers=[
        ("host", "swapd"), ("content-type", "application/json"),
        ("content-length", str(length))])) or b""
    data += conn.send(h11.Data(data=body)) or b""
    if length == len(body):
        data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
    return conn


async def read_answer(stream: trio.SocketStream, conn: h11.Connection) -> tuple[int, bytes]:
    """The status and body of the whole answer."""
    status, body = 0, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, body


async def test_a_stalled_body_gets_408_on_every_route_that_reads_one(tmp_path: Path) -> None:
    async with swapd(tmp_path, timeouts={"body": "300ms"}) as (running, client):
        for path in ("/v1/chat/completions", "/swapd/load", "/api/show", "/api/chat",
                     "/models/load"):
            stream = await open_client(running)
            conn = await send_head(stream, path, b'{"model": ', declared=400)
            with trio.fail_after(10):  # a deadline on the test, not a measurement
                status, body = await read_answer(stream, conn)
            assert status == 408, path
            assert error_code(body) == "body_timeout", path
            await stream.aclose()
        # Complete bodies still work on each of those routes.
        assert (await client.post("/api/show", json={"model": "a"})).status_code == 200
        assert running.supervisor.state.value == "idle"  # nothing was loaded by a stall


async def test_bodies_past_the_budget_get_503_at_once_and_the_budget_comes_back(
        tmp_path: Path) -> None:
    async with swapd(tmp_path, timeouts={"body": "5m"},
                     security={"max_body": "64KiB", "max_pending_bodies": "128KiB"}) as (
            running, client):
        stalled = []
        for _ in range(2):  # each reserves its declared 64KiB, and stalls
            stream = await open_client(running)
            await send_head(stream, "/v1/chat/completions", b"{", declared=64 * 1024)
            stalled.append(stream)
        with trio.fail_after(10):
            while True:  # until both are being read (their heads were parsed)
                refused = await client.post("/v1/chat/completions", json=chat("a"))
                if refused.status_code == 503:
                    break
                await trio.sleep(0.05)
        assert refused.json()["error"]["code"] == "server_busy"
        assert refused.headers["retry-after"] == "1"
        for stream in stalled:  # they go away: their reservations come back
            await stream.aclose()
        with trio.fail_after(10):
            while (await client.post("/api/show", json={"model": "a"})).status_code != 200:
                await trio.sleep(0.05)
        answered = await client.post("/v1/chat/completions", json=chat("a"))
        assert answered.status_code == 200


async def test_stalled_headers_are_cut_at_timeouts_headers(tmp_path: Path) -> None:
    async with swapd(tmp_path, timeouts={"headers": "300ms"}) as (running, client):
        stream = await open_client(running)
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: sw")  # slowloris
        with trio.fail_after(10):
            while await stream.receive_some(65536):
                pass  # the server closes the connection: EOF
        await stream.aclose()
        assert (await client.get("/health")).status_code == 200


# -- clients that stop reading --------------------------------------------------------


@pytest.mark.parametrize("how", ["stops", "half_closes", "closes"])
async def test_a_client_that_stops_reading_gives_its_lease_back(tmp_path: Path,
                                                                 how: str) -> None:
    """The client stops reading a long stream; its lease must come back (so a swap can
    proceed) although swapd's write to it is blocked: within ``timeouts.send`` if it
    just stops, at once if it closes or half-closes."""
    send = "1s" if how == "stops" else "5m"  # so only "stops" relies on the send deadline
    async with swapd(tmp_path, timeouts={"send": send, "drain": "5m"},
                     queue={"starvation_bound": "0s"},
                     a_flags={"fake-tokens": 2_000_000}) as (running, client):
        assert (await client.post("/v1/chat/completions",
                                  json=chat("a", max_tokens=1))).status_code == 200
        stream = await open_client(running, rcvbuf=4096)
        conn = await send_head(stream, "/v1/chat/completions",
                               json.dumps(chat("a", stream=True)).encode())
        conn.receive_data(await stream.receive_some(4096))
        assert isinstance(conn.next_event(), h11.Response)  # the stream has begun
        sup = running.supervisor
        assert sup.n_inflight == 1
        await trio.sleep(0.5)  # long enough for both socket buffers to fill
        if how == "half_closes":
            stream.socket.shutdown(socket.SHUT_WR)
        elif how == "closes":
            await stream.aclose()
        # The drain deadline is 5 minutes: only the lease coming back gets under this.
        # (Filling the socket buffers alone takes seconds with the fake's output rate.)
        with trio.fail_after(60):
            other = await client.post("/v1/chat/completions", json=chat("b"))
            assert other.status_code == 200  # the swap went ahead
            while sup.n_inflight:  # b's own lease is released just after its answer
                await trio.sleep(0.02)
        assert other.json()["choices"][0]["message"]["content"].startswith("fake:b:")
        await stream.aclose()


async def test_the_end_of_an_answer_is_not_taken_for_a_client_leaving(
        tmp_path: Path) -> None:
    """Hypercorn reports ``http.disconnect`` as soon as an answer is complete: that must
    not close the child's connection (it is kept for the next request) as a client that
    left mid-answer would."""
    async with swapd(tmp_path) as (running, client):
        for _ in range(3):
            answer = await client.post("/v1/chat/completions", json=chat("a"))
            assert answer.status_code == 200
            await trio.testing.wait_all_tasks_blocked()  # the exchange has ended
        proc = running.supervisor.proc
        assert proc is not None
        assert len(proc.pool._idle) == 1  # one connection, reused by every request


# -- a child that stops ---------------------------------------------------------------


async def test_a_stopped_child_ends_its_requests_and_is_replaced(tmp_path: Path) -> None:
    """SIGSTOP the child while it streams one answer and generates another: both end
    with its failure (in-band / 502), it is killed, not left stopped, and the next
    request gets a new one."""
    async with swapd(tmp_path,
                     timeouts={"health_check": "300ms", "health_check_timeout": "300ms",
                               "first_byte": "5m", "upstream_idle": "5m"},
                     restart={"backoff": "0s"},
                     a_flags={"fake-tokens": 100_000, "fake-token-delay-ms": 20}) as (
            running, client):
        sup = running.supervisor
        stopped_pid: int | None = None
        try:
            async with trio.open_nursery() as nursery:
                answers: dict[str, Any] = {}

                async def plain() -> None:
                    answers["plain"] = await client.post("/v1/chat/completions",
                                                         json=chat("a"))

                async with client.stream("POST", "/v1/chat/completions",
                                         json=chat("a", stream=True)) as streamed:
                    chunks = streamed.aiter_raw()
                    text = await chunks.__anext__()
                    while b"fake:a:" not in text:  # until the model itself is answering
                        text += await chunks.__anext__()
                    nursery.start_soon(plain)
                    proc = sup.proc
                    assert proc is not None
                    with trio.fail_after(10):
                        while sup.n_inflight < 2:
                            await trio.sleep(0.02)
                    stopped_pid = proc.pid
                    os.kill(proc.pid, signal.SIGSTOP)
                    with trio.fail_after(30):
                        text += b"".join([chunk async for chunk in chunks])
            _comments, data = sse_events(text.decode())
            assert data[-1] == "[DONE]"
            assert "stopped answering its health check" in data[-2]["error"]["message"]
            assert answers["plain"].status_code == 502
            error = answers["plain"].json()["error"]
            assert error["code"] == "model_failed"
            assert "stopped answering its health check" in error["message"]
            with trio.fail_after(10):
                await proc.exited.wait()  # reaped by swapd
            assert proc.exit_code == -signal.SIGKILL  # killed, not asked: it is stopped
            with pytest.raises(ProcessLookupError):
                os.kill(proc.pid, 0)  # gone: not left stopped
            assert sup.stats["hangs"] == 1
            assert (await client.get("/swapd/status")).json()["last_error"]["kind"] == "hung"
            metrics = (await client.get("/metrics")).text
            assert 'swapd_child_failures_total{kind="hung",profile="a"} 1.0' in metrics
            with trio.fail_after(30):
                again = await client.post("/v1/chat/completions",
                                          json=chat("a", max_tokens=2))
            assert again.status_code == 200
            assert sup.proc is not None and sup.proc.pid != proc.pid
        finally:
            if stopped_pid is not None:  # never leave a stopped process behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped_pid, signal.SIGCONT)


async def test_a_silent_answer_is_cut_at_its_deadlines(tmp_path: Path) -> None:
    """No byte for ``first_byte`` before the body, or for ``upstream_idle`` between
    reads: 502 ``model_failed``, or an in-band error once the 200 is out. Each profile
    may set its own; the health probe is off, so only these deadlines act."""
    async with swapd_with_profiles(
            tmp_path, {"a": {"timeouts": {"first_byte": "300ms"}},
                       "b": {"timeouts": {"upstream_idle": "300ms"}}},
            timeouts={"health_check": 0}, a_flags={"fake-token-delay-ms": 3000},
            b_flags={"fake-token-delay-ms": 3000}) as (running, client):
        plain = await client.post("/v1/chat/completions", json=chat("a"))
        assert plain.status_code == 502
        error = plain.json()["error"]
        assert error["code"] == "model_failed"
        assert "timeouts.first_byte" in error["message"]
        assert running.supervisor.proc is not None  # the child itself is not blamed
        streamed = await client.post("/v1/chat/completions", json=chat("b", stream=True))
        assert streamed.status_code == 200
        _comments, data = sse_events(streamed.text)
        assert data[-1] == "[DONE]"
        assert "timeouts.upstream_idle" in data[-2]["error"]["message"]

