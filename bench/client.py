"""The load generator: a lean HTTP/1.1 client on raw asyncio protocols.

Why not httpx: at 50 concurrent clients on 2 cores, httpx's own per-request cost
(hundreds of microseconds of Python in httpcore, h11 and the pool) is of the same order
as the difference we want to measure, and it shares the cores with swapd. This client
is one ``asyncio.Protocol`` per connection with keep-alive, no pool, no header objects:
it writes pre-built request bytes and parses just enough of the answer (status line,
``content-length``, ``transfer-encoding: chunked``, ``connection: close``) to know where
it ends, timestamping the head, the first body byte and the first SSE ``data:`` event
as they arrive. Its own CPU cost per request is measured and reported
(``client_cpu_us``) so a reader can judge it. Direct and swapd runs use the same client.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

clock = time.perf_counter

DATA = b"data:"
DONE = b"data: [DONE]"



def no_delay(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """The transport of a new connection, with Nagle off (requests go out at once)."""
    assert isinstance(transport, asyncio.Transport)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return transport

class HttpError(Exception):
    """The connection broke, or the answer did not parse, or it took too long."""


@dataclass
class Answer:
    """One response, with the times (``clock()``) at which its parts arrived."""

    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray | None = None
    started: float = 0.0
    head_at: float = 0.0
    first_body_at: float = 0.0
    first_event_at: float = 0.0
    ended_at: float = 0.0
    events: int = 0
    done_seen: bool = False

    @property
    def latency(self) -> float:
        return self.ended_at - self.started

    @property
    def ttfb(self) -> float:
        """Request written to the first byte of the body (the head when it has none)."""
        return (self.first_body_at or self.head_at) - self.started

    def json(self) -> Any:
        assert self.body is not None
        return json.loads(bytes(self.body))


def build_request(method: str, path: str, host: str, body: bytes = b"",
                  headers: Iterable[tuple[str, str]] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chat_body(model: str, *, max_tokens: int = 1, stream: bool = False,
              **extra: Any) -> bytes:
    payload: dict[str, Any] = {"model": model, "max_tokens": max_tokens,
                               "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        payload["stream"] = True
    payload.update(extra)
    return json.dumps(payload).encode()


class _Protocol(asyncio.Protocol):
    """Parses one answer at a time off one connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.buf = bytearray()
        self.answer: Answer | None = None
        self.future: asyncio.Future[Answer] | None = None
        self.keep_body = True
        self.count_events = False
        self._tail = b""
        self._phase = "head"
        self._remaining = 0  # content-length left, or the current chunk's bytes left
        self._mode = "length"  # "length", "chunked", "close"
        self.keep_alive = True

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = no_delay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.future is not None and not self.future.done():
            if self._mode == "close" and self._phase == "body" and self.answer is not None:
                self._finish()
            elif self._phase == "head" and not self.buf:
                self.future.set_exception(HttpError(f"connection lost: {exc!r}"))
            else:
                self.future.set_exception(HttpError(f"answer cut short: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        now = clock()
        answer = self.answer
        if answer is None or self.future is None or self.future.done():
            return  # unsolicited bytes (a late keep-alive close): ignore
        self.buf += data
        try:
            self._parse(answer, now)
        except (ValueError, IndexError) as error:
            self.future.set_exception(HttpError(f"bad answer: {error!r}"))
            self.keep_alive = False

    # -- parsing --

    def _parse(self, answer: Answer, now: float) -> None:
        buf = self.buf
        if self._phase == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).split(b"\r\n")
            del buf[: end + 4]
            answer.status = int(head[0].split(b" ", 2)[1])
            answer.head_at = now
            headers = answer.headers
            for line in head[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if headers.get(b"connection", b"").lower() == b"close":
                self.keep_alive = False
            if b"content-length" in headers:
                self._mode = "length"
                self._remaining = int(headers[b"content-length"])
            elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                self._mode = "chunked"
                self._remaining = -1  # expecting a size line
            else:
                self._mode = "close"
                self.keep_alive = False
            self._phase = "body"
            if self._mode == "length" and self._remaining == 0:
                self._finish()
                return
        if self._mode == "length":
            take = min(len(buf), self._remaining)
            if take:
                self._payload(answer, bytes(buf[:take]), now)
                del buf[:take]
                self._remaining -= take
            if self._remaining == 0:
                self._finish()
        elif self._mode == "close":
            if buf:
                self._payload(answer, bytes(buf), now)
                buf.clear()
        else:
            self._chunked(answer, now)

    def _chunked(self, answer: Answer, now: float) -> None:
        buf = self.buf
        pos = 0
        n = len(buf)
        while pos < n:
            if self._remaining == -1:  # a size line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    self._remaining = -2  # trailers: wait for the empty line
                else:
                    self._remaining = size
            elif self._remaining == -2:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                if eol == pos:  # the empty line after the last chunk
                    del buf[: eol + 2]
                    self._finish()
                    return
                pos = eol + 2  # a trailer line: skip
            elif self._remaining == -3:  # CRLF after a chunk's data
                if n - pos < 2:
                    break
                pos += 2
                self._remaining = -1
            else:
                take = min(n - pos, self._remaining)
                self._payload(answer, bytes(buf[pos: pos + take]), now)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._remaining = -3
        del buf[:pos]

    def _payload(self, answer: Answer, data: bytes, now: float) -> None:
        if not answer.first_body_at:
            answer.first_body_at = now
        if self.keep_body:
            assert answer.body is not None
            answer.body += data
        if self.count_events:
            window = self._tail + data
            found = window.count(DATA)
            if found:
                if not answer.events:
                    answer.first_event_at = now
                answer.events += found
                if DONE in window:
                    answer.done_seen = True
            self._tail = window[-12:]

    def _finish(self) -> None:
        assert self.answer is not None and self.future is not None
        self.answer.ended_at = clock()
        self._phase = "head"
        self._tail = b""
        if not self.future.done():
            self.future.set_result(self.answer)

    # -- one request --

    def start(self, payload: bytes, *, keep_body: bool, count_events: bool) -> Answer:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.future = loop.create_future()
        self.answer = Answer(body=bytearray() if keep_body else None)
        self.keep_body = keep_body
        self.count_events = count_events
        self._phase = "head"
        self._tail = b""
        self.answer.started = clock()
        self.transport.write(payload)
        return self.answer


class Connection:
    """One keep-alive connection that reconnects when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.proto: _Protocol | None = None
        self.connects = 0
        self.connect_seconds: list[float] = []  # how long each TCP connect took

    async def _ensure(self) -> _Protocol:
        proto = self.proto
        if proto is None or proto.closed or not proto.keep_alive:
            if proto is not None and proto.transport is not None:
                proto.transport.close()
            loop = asyncio.get_running_loop()
            started = clock()
            _, proto = await loop.create_connection(_Protocol, self.host, self.port)
            self.connect_seconds.append(clock() - started)
            self.proto = proto
            self.connects += 1
        return proto

    async def request(self, payload: bytes, *, request_timeout: float = 60.0,
                      keep_body: bool = True, count_events: bool = False) -> Answer:
        """Send pre-built request bytes and wait for the whole answer.

        A kept-alive connection the server closed just before we wrote to it (llama-server
        closes after every stream without saying so) is retried once on a new one, as
        HTTP clients do when nothing of the answer has arrived.
        """
        reused = self.proto is not None and not self.proto.closed and self.proto.keep_alive
        try:
            return await self._request(payload, request_timeout, keep_body, count_events)
        except HttpError as error:
            if not reused or not str(error).startswith("connection lost"):
                raise
        return await self._request(payload, request_timeout, keep_body, count_events)

    async def _request(self, payload: bytes, request_timeout: float, keep_body: bool,
                       count_events: bool) -> Answer:
        try:
            proto = await asyncio.wait_for(self._ensure(), request_timeout)
        except (OSError, TimeoutError) as error:
            raise HttpError(f"cannot connect to {self.host}:{self.port}: {error!r}") from None
        proto.start(payload, keep_body=keep_body, count_events=count_events)
        assert proto.future is not None
        try:
            return await asyncio.wait_for(proto.future, request_timeout)
        except TimeoutError:
            self.close()
            raise HttpError(f"no complete answer within {request_timeout:g}s") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None


async def fetch(host: str, port: int, method: str, path: str, body: bytes = b"", *,
                request_timeout: float = 60.0, count_events: bool = False) -> Answer:
    """One request on a fresh connection (probes, control calls)."""
    conn = Connection(host, port)
    try:
        return await conn.request(build_request(method, path, f"{host}:{port}", body),
                                  request_timeout=request_timeout, count_events=count_events)
    finally:
        conn.close()
