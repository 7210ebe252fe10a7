"""Exact requests for tests that must control every byte a client sends.

httpx (rightly) normalises what it sends: it removes ``.``/``..`` segments, encodes
spaces, refuses control characters. Tests of how swapd treats such requests need the
request line as written, so they talk HTTP/1.1 over a plain socket here: one request per
connection (``Connection: close``), and for an event stream only its head is read.

``RawConnection`` goes further, for the wire tests: any bytes, in any pieces, several
answers on one connection, and whether (and when) the server closed it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from swapd.http.fastpath import FastPath

ANSWER_TIMEOUT = 15.0
"""Real-time deadline for one answer: turns a hang into a failure, never a measurement."""


@attrs.frozen
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    status_line: str = ""

    @property
    def streamed(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")

    def error_code(self) -> Any:
        return error_code(self.body)


def error_code(body: bytes) -> Any:
    """The OpenAI-shaped error's ``code``, or None when the body is not one.

    Ollama's shape (``{"error": "..."}``, under ``/api/``) has no code: the refusals
    that come before any handler runs are told by their fixed messages."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(error, str):
        return next((code for prefix, code in OLLAMA_REFUSALS if error.startswith(
            prefix)), None)
    return error.get("code") if isinstance(error, dict) else None


OLLAMA_REFUSALS = (("the path ", "invalid_path"), ("not found: ", "not_found"),
                   ("method not allowed: ", "method_not_allowed"),
                   ("missing or invalid API key", "invalid_api_key"),
                   ("request body is larger than ", "body_too_large"),
                   ("the request body did not arrive within ", "body_timeout"))
"""swapd's refusals in Ollama's shape: how each message begins, and its OpenAI code."""


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


STATUS_LINE = re.compile(r"HTTP/1\.[01] [1-5][0-9][0-9]( [\t -~\x80-\xff]*)?")
"""A well-formed status line (RFC 9112 §4; the reason phrase may be empty)."""

MAX_ANSWER_HEAD = 64 * 1024
"""An answer head longer than this is not one a correct server sends."""


class ServerClosed(Exception):
    """The server closed the connection (FIN or RST) where an answer was awaited."""

    def __init__(self, received: bytes) -> None:
        super().__init__(f"connection closed; bytes of an unfinished answer: {received!r}")
        self.received = received


class RawConnection:
    """One client connection that sends bytes exactly as given and reads answers.

    Answers are parsed strictly (a well-formed status line, CRLF line ends, a body by
    ``Content-Length``, chunked, or up to the close), so a malformed answer fails the
    test. Every wait has a real-time deadline (``within`` seconds), never a measurement.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawConnection:
        sock = trio.socket.socket()
        await sock.connect((host, port))
        return cls(trio.SocketStream(sock))

    async def __aenter__(self) -> RawConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send(self, data: bytes) -> bool:
        """Send ``data``; False when the server had already closed (reset) the connection."""
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError:
            return False
        return True

    async def _fill(self) -> bool:
        """Read more into the buffer; False at EOF (a reset counts as one)."""
        if self.eof:
            return False
        try:
            chunk = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    async def _until(self, marker: bytes) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            if len(self.buffer) > MAX_ANSWER_HEAD:
                raise AssertionError(f"no {marker!r} in {bytes(self.buffer[:200])!r}...")
            if not await self._fill():
                raise ServerClosed(bytes(self.buffer))
        taken = bytes(self.buffer[:end])
        del self.buffer[:end + len(marker)]
        return taken

    async def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not await self._fill():
                raise ServerClosed(bytes(self.buffer))
        taken = bytes(self.buffer[:size])
        del self.buffer[:size]
        return taken

    async def answer(self, within: float = ANSWER_TIMEOUT, *,
                     head_only: bool = False) -> RawAnswer:
        """The next answer (a 1xx too); ``ServerClosed`` if the connection ends first."""
        with trio.fail_after(within):
            head = (await self._until(b"\r\n\r\n")).decode("latin-1")
            status_line, *lines = head.split("\r\n")
            if not STATUS_LINE.fullmatch(status_line):
                raise AssertionError(f"malformed status line {status_line!r} in {head!r}")
            headers: dict[str, str] = {}
            for line in lines:
                name, colon, value = line.partition(":")
                if not colon or not name or name != name.strip() or "\n" in line:
                    raise AssertionError(f"malformed header line {line!r} in {head!r}")
                headers[name.lower()] = value.strip(" \t")
            status = int(status_line.split(" ")[1])
            answer = RawAnswer(status, headers, b"", status_line)
            if head_only or status < 200 or status in (204, 304):
                return answer
            if "chunked" in headers.get("transfer-encoding", ""):
                body = b""
                while size := int((await self._until(b"\r\n")).split(b";")[0], 16):
                    body += await self._exactly(size)
                    if await self._exactly(2) != b"\r\n":
                        raise AssertionError(f"chunk not ended by CRLF in {head!r}")
                while await self._until(b"\r\n"):
                    pass  # trailers
            elif "content-length" in headers:
                body = await self._exactly(int(headers["content-length"]))
            else:
                while await self._fill():
                    pass
                body = bytes(self.buffer)
                self.buffer.clear()
        return attrs.evolve(answer, body=body)

    async def answer_or_close(self, within: float = ANSWER_TIMEOUT) -> RawAnswer | None:
        """The next answer, or None when the server closes the connection cleanly
        before sending any byte of one."""
        try:
            return await self.answer(within)
        except ServerClosed as closed:
            if closed.received:
                raise AssertionError(f"answer cut short: {closed.received!r}") from None
            return None

    async def closed(self, within: float = ANSWER_TIMEOUT) -> bytes:
        """Wait until the server closes the connection; returns what came before it."""
        with trio.fail_after(within):
            while await self._fill():
                pass
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest

    async def nothing_within(self, seconds: float) -> bool:
        """True when no byte arrives (and no close) for ``seconds``."""
        with trio.move_on_after(seconds):
            await self._fill()
            return False
        return True
