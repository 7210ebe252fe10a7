"""Exact requests for tests that must control every byte a client sends.

httpx (rightly) normalises what it sends: it removes ``.``/``..`` segments, encodes
spaces, refuses control characters. Tests of how swapd treats such requests need the
request line as written, so they talk HTTP/1.1 over a plain socket here: one request per
connection (``Connection: close``), and for an event stream only its head is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from swapd.fastpath import FastPath

ANSWER_TIMEOUT = 15.0
"""Real-time deadline for one answer: turns a hang into a failure, never a measurement."""


@attrs.frozen
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def streamed(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")

    def error_code(self) -> Any:
        """The OpenAI-shaped error's ``code``, or None when the body is not one."""
        try:
            error = json.loads(self.body)["error"]
            return error["code"] if isinstance(error, dict) else None
        except (ValueError, KeyError, TypeError):
            return None


def request_bytes(method: str, target: str | bytes,
                  headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    if isinstance(target, str):
        target = target.encode("ascii")
    head = [method.encode("ascii") + b" " + target + b" HTTP/1.1", b"host: swapd",
            b"connection: close", b"content-length: " + str(len(body)).encode()]
    head += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def exchange(port: int, request: bytes, host: str = "127.0.0.1") -> RawAnswer:
    """Send ``request`` as is; return the answer (the head only, for an event stream)."""
    with trio.fail_after(ANSWER_TIMEOUT):
        sock = trio.socket.socket()  # no name lookup: open_tcp_stream's costs a thread
        await sock.connect((host, port))
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(request)
            return await read_answer(stream)


async def read_answer(stream: trio.abc.ReceiveStream) -> RawAnswer:
    """One answer: its head only for an event stream; else its Content-Length, or
    until the connection closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise AssertionError(f"connection closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    answer = RawAnswer(int(status_line.split(" ")[1]), headers, b"")
    if answer.streamed:
        return answer
    length = int(headers.get("content-length", -1))
    while len(body) != length and (chunk := await stream.receive_some(65536)):
        body += chunk
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return attrs.evolve(answer, body=body)


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out, body = out + body[:n], body[n + 2:]
    return out


async def wire_exchange(server: FastPath, request: bytes) -> RawAnswer:
    """Hand ``request`` to swapd's connection handler in-process, over a socket pair.

    The same bytes as ``exchange`` sends and the same code that serves them (the fast
    path, and hypercorn for what it hands over), without a listening socket or a TCP
    handshake: for walks of thousands of requests.
    """
    ours, theirs = trio.socket.socketpair()
    with trio.fail_after(ANSWER_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_connection, trio.SocketStream(theirs))
            async with trio.SocketStream(ours) as stream:
                await stream.send_all(request)
                answer = await read_answer(stream)
            nursery.cancel_scope.cancel()
    return answer
