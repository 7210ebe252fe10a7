"""The hot-path HTTP/1.1 client against a small real server on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h11
import pytest
import trio

from swapd.net.upstream import ChildPool, UpstreamError, UpstreamTimeout


class Server:
    """Answers each request with ``chunks`` pieces; counts connections and requests."""

    def __init__(self, chunks: int = 1, close_after: int | None = None,
                 pad: int = 0) -> None:
        self.chunks = chunks
        self.pad = pad  # bytes of padding after each chunk's text
        self.close_after = close_after  # requests per connection, then close it
        self.connections = 0
        self.requests: list[h11.Request] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        with contextlib.suppress(trio.BrokenResourceError):  # a client that left
            await self._serve(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        served = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                self.requests.append(event)
            elif isinstance(event, h11.EndOfMessage):
                served += 1
                out = conn.send(h11.Response(status_code=200, headers=[
                    ("transfer-encoding", "chunked")])) or b""
                for i in range(self.chunks):
                    out += conn.send(h11.Data(data=f"chunk{i};".encode() + b" " * self.pad)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out)
                if self.close_after is not None and served >= self.close_after:
                    await stream.aclose()
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return


@asynccontextmanager
async def serving(server: Server) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, server.handle, 0,
                                                  host="127.0.0.1"))
        yield listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def ask(pool: ChildPool, body: bytes = b"{}") -> bytes:
    response = await pool.request(b"POST", b"/v1/x", [(b"content-type", b"a/b")], body)
    try:
        assert response.status_code == 200
        return await response.aread()
    finally:
        await response.aclose()


async def test_connections_are_kept_alive_and_reused() -> None:
    server = Server(chunks=3)
    async with serving(server) as port:
        pool = ChildPool("127.0.0.1", port)
        for _ in range(5):
            assert await ask(pool) == b"chunk0;chunk1;chunk2;"
        assert server.connections == 1
        request = server.requests[0]
        headers = dict(request.headers)
        assert headers[b"host"] == f"127.0.0.1:{port}".encode()
        assert headers[b"content-length"] == b"2"
        await pool.aclose()


async def test_a_connection_closed_while_idle_is_retried_on_a_fresh_one() -> None:
    server = Server(close_after=1)  # like llama-server's "Keep-Alive: max=..."
    async with serving(server) as port:
        pool = ChildPool("127.0.0.1", port)
        for _ in range(3):
            assert await ask(pool) == b"chunk0;"
        assert server.connections == 3
        assert len(server.requests) == 3  # each request was sent exactly once
        await pool.aclose()


async def test_a_half_read_answer_is_not_reused() -> None:
    server = Server(chunks=50, pad=4096)  # 200 KB: more than one read takes
    async with serving(server) as port:
        pool = ChildPool("127.0.0.1", port)
        response = await pool.request(b"POST", b"/", [], b"")
        async for _chunk in response.aiter_raw():
            break  # the client went away mid-answer
        assert not response.complete
        await response.aclose()
        assert await ask(pool) == b"".join(f"chunk{i};".encode() + b" " * 4096
                                           for i in range(50))
        assert server.connections == 2
        await pool.aclose()


async def test_idle_connections_expire(mock_clock: Any) -> None:
    server = Server()
    async with serving(server) as port:
        pool = ChildPool("127.0.0.1", port, keepalive_expiry=4.0)
        await ask(pool)
        mock_clock.jump(3)
        await ask(pool)
        assert server.connections == 1
        mock_clock.jump(5)  # longer than llama-server keeps an idle connection
        await ask(pool)
        assert server.connections == 2
        await pool.aclose()


async def test_nothing_listening_is_an_upstream_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = ChildPool("127.0.0.1", port)
    with pytest.raises(UpstreamError, match=f"cannot connect to 127.0.0.1:{port}"):
        await ask(pool)


async def test_a_streamed_answer_does_not_go_back_to_the_pool() -> None:
    class SSEServer(Server):
        async def handle(self, stream: trio.SocketStream) -> None:
            self.connections += 1
            conn = h11.Connection(h11.SERVER)
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
            await stream.send_all(
                (conn.send(h11.Response(status_code=200, headers=[
                    ("content-type", "text/event-stream"), ("transfer-encoding", "chunked")]))
                 or b"") + (conn.send(h11.Data(data=b"data: x\n\n")) or b"")
                + (conn.send(h11.EndOfMessage()) or b""))
            await stream.aclose()  # as llama-server does after a stream

    server = SSEServer()
    async with serving(server) as port:
        pool = ChildPool("127.0.0.1", port)
        for _ in range(3):
            assert await ask(pool) == b"data: x\n\n"
        assert server.connections == 3
        assert pool._idle == []  # never pooled, so never a failed send and a retry
        await pool.aclose()


class SilentServer(Server):
    """Reads the request, then answers in ``pauses``: (seconds to wait, bytes to send)."""

    def __init__(self, pauses: list[tuple[float, bytes]]) -> None:
        super().__init__()
        self.pauses = pauses

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        with contextlib.suppress(trio.BrokenResourceError):  # a client that left
            await self._serve(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        for pause, data in self.pauses:
            await trio.sleep(pause)
            await stream.send_all(data)
        await trio.sleep_forever()  # a hung child: the connection stays open, silent


HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_no_head_within_first_byte_timeout_is_an_upstream_timeout(
        autojump_clock: Any) -> None:
    async with serving(SilentServer([])) as port:
        pool = ChildPool("127.0.0.1", port)
        began = trio.current_time()
        with pytest.raises(UpstreamTimeout, match=r"no answer within 300s "
                                                  r"\(timeouts.first_byte\)"):
            await pool.request(b"POST", b"/", [], b"{}", first_byte_timeout=300,
                               idle_timeout=5)
        assert trio.current_time() - began == pytest.approx(300)
        assert pool._idle == []  # that connection is closed, never reused
        await pool.aclose()


async def test_first_byte_then_idle_deadlines_bound_an_answer(autojump_clock: Any) -> None:
    # The head at once, the first byte of the body after 200 s (prompt processing),
    # two more within 20 s of each other, then nothing.
    server = SilentServer([(0, HEAD), (200, chunk(b"one")), (20, chunk(b"two")),
                           (20, chunk(b"three"))])
    async with serving(server) as port:
        pool = ChildPool("127.0.0.1", port)
        response = await pool.request(b"POST", b"/", [], b"{}", first_byte_timeout=300,
                                      idle_timeout=30)
        received = []
        with pytest.raises(UpstreamTimeout, match=r"nothing for 30s "
                                                  r"\(timeouts.upstream_idle\)"):
            async for data in response.aiter_raw():
                received.append(data)
                last = trio.current_time()
        assert received == [b"one", b"two", b"three"]
        assert trio.current_time() - last == pytest.approx(30)
        assert pool.last_heard == last  # what the liveness probe looks at
        await response.aclose()
        await pool.aclose()


async def test_a_relay_holds_the_same_deadlines_with_one_scope(autojump_clock: Any) -> None:
    """``pipe`` moves one deadline lazily instead of one per read: chunks 25 s and 6 s
    apart (each within the 30 s idle timeout, together far past it) all go through, the
    deadline firing early (moved only every 7.5 s) is not taken for a silence, and the
    silence after the last ends it at 30 s to the second; the first byte may take 200 s."""
    gaps = [(0, HEAD), (200, chunk(b"first"))] + [
        (25 if i < 3 else 6, chunk(b"%d" % i)) for i in range(8)]
    server = SilentServer(gaps)
    async with serving(server) as port:
        pool = ChildPool("127.0.0.1", port)
        response = await pool.request(b"POST", b"/", [], b"{}", first_byte_timeout=300,
                                      idle_timeout=30)
        sent: list[tuple[float, bytes]] = []

        async def send(data: bytes) -> None:
            sent.append((trio.current_time(), data))

        with pytest.raises(UpstreamTimeout, match=r"nothing for 30s "
                                                  r"\(timeouts.upstream_idle\)"):
            await response.pipe(send)
        assert b"".join(data for _, data in sent) == b"".join(
            chunk(data) for data in [b"first", *(b"%d" % i for i in range(8))])
        assert trio.current_time() - sent[-1][0] == pytest.approx(30)
        await response.aclose()
        await pool.aclose()


async def test_a_relay_whose_first_byte_never_comes_ends_at_first_byte_timeout(
        autojump_clock: Any) -> None:
    server = SilentServer([(0, HEAD)])
    async with serving(server) as port:
        pool = ChildPool("127.0.0.1", port)
        response = await pool.request(b"POST", b"/", [], b"{}", first_byte_timeout=300,
                                      idle_timeout=30)
        sent: list[bytes] = []

        async def send(data: bytes) -> None:
            sent.append(data)

        began = trio.current_time()
        with pytest.raises(UpstreamTimeout, match=r"timeouts.first_byte"):
            await response.pipe(send)
        assert sent == []
        assert trio.current_time() - began == pytest.approx(300)
        await response.aclose()
        await pool.aclose()


async def test_a_body_that_never_starts_hits_first_byte_timeout(autojump_clock: Any) -> None:
    async with serving(SilentServer([(0, HEAD)])) as port:
        pool = ChildPool("127.0.0.1", port)
        response = await pool.request(b"POST", b"/", [], b"{}", first_byte_timeout=300,
                                      idle_timeout=30)
        began = trio.current_time()
        with pytest.raises(UpstreamTimeout, match=r"timeouts.first_byte"):
            await response.aread()
        assert trio.current_time() - began == pytest.approx(300)
        await response.aclose()
        await pool.aclose()
