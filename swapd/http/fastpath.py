"""The data plane: swapd's listening socket, and the inference requests served on it.

swapd owns its listening socket. One trio task per connection reads each request head
with h11 (the sans-IO parser hypercorn itself uses) and checks what every route needs
checked: the head's size and deadline, the path, the keys, the body's size, deadline and
memory budget. Inference POSTs are then served right here (``proxy.InferenceProxy``)
and llama-server's answer goes back as the bytes it sent. Any other request is handed,
with its connection, to hypercorn and the Quart app, which answer that one request and
close the connection; the client's next request comes on a new connection, read here.

Why not hypercorn for everything: its machinery per request (a task, ASGI messages, a
second h11 parse) and per chunk (an ASGI message, h11 decoding upstream and framing
again downstream) cost more CPU than all of swapd's own work, and made swapd, not the
GPU, the limit at a few thousand tokens per second (docs/design.md, bench/README.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any, Protocol
from urllib.parse import unquote

import attrs
import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from swapd.config import Config
from swapd.http import cors, progress
from swapd.http.auth import path_problem
from swapd.net.upstream import ChildResponse, HttpxResponse, UpstreamError
from swapd.net.wire import (
    LAST_CHUNK,
    chunk,
    close_raw,
    raw_socket,
    recv_some,
    response_head,
    send_all,
)

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
"""Largest request head (request line and headers) accepted; larger ones get 431."""

MAX_HEADERS = 100
"""Most header fields in one request head; more get 431."""

RECEIVE_SIZE = 65536

BUSY_RETRY_AFTER = 1
"""Retry-After (seconds) of a 503 for a body over ``security.max_pending_bodies``."""

NATIVE_POSTS = frozenset({
    "/completion", "/completions", "/chat/completions", "/infill", "/embedding",
    "/embeddings", "/rerank", "/reranking", "/tokenize", "/detokenize", "/apply-template",
})
"""llama-server's own routes outside /v1/ (editor plugins use /infill): proxied too."""

OLLAMA_POSTS = frozenset({"/api/chat", "/api/generate", "/api/embed", "/api/embeddings"})
"""Ollama's generation routes: translated to llama-server's (``ollama.py``), then proxied."""

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
_DROP_RESPONSE = HOP_BY_HOP | {b"server", b"content-length"} | cors.UPSTREAM_HEADERS
"""Never relayed from an upstream's head: swapd frames the body it sends itself, and
answers CORS itself (llama-server sends an empty ``Access-Control-Allow-Origin``)."""

_HANDED_OFF_DROP = frozenset({b"connection", b"keep-alive", b"expect", b"transfer-encoding",
                              b"content-length", b"upgrade", b"http2-settings"})
"""Replaced in the request hypercorn gets: its body is already read (and de-chunked),
and it is answered in HTTP/1.1 whatever upgrade the client offered."""

_JSON = (b"content-type", b"application/json")
_CONTENT_LENGTH = re.compile(rb"(?im)^content-length[ \t]*:")
_LISTED_LENGTH = re.compile(rb"(?im)^content-length[ \t]*:[^\n]*,")
_TRANSFER_ENCODING = re.compile(rb"(?im)^transfer-encoding[ \t]*:")
_FOLDED = re.compile(rb"\n[ \t]")


def _framing_problem(head: bytes, names: list[bytes]) -> str | None:
    """Why a head's framing is ambiguous, or None. h11 merges equal Content-Lengths,
    joins folded lines, and lets Transfer-Encoding win over Content-Length: a proxy in
    front of swapd may read any of those another way."""
    if _FOLDED.search(head.split(b"\n", 1)[-1]):
        return "a header line is folded (obs-fold); send each header on one line"
    if b"transfer-encoding" in names and b"content-length" in names:
        return "a request may not have both Content-Length and Transfer-Encoding"
    if len(_CONTENT_LENGTH.findall(head)) > 1 or _LISTED_LENGTH.search(head):
        return "more than one Content-Length header"
    if len(_TRANSFER_ENCODING.findall(head)) > 1:
        return "more than one Transfer-Encoding header"
    return None


def is_ollama_path(path: str) -> bool:
    """Under Ollama's ``/api/`` (not LM Studio's ``/api/v1/``): errors are Ollama's."""
    return path.startswith("/api/") and not path.startswith("/api/v1/")


def is_inference(method: str, path: str) -> bool:
    """Served by the fast path: POSTs under /v1/, llama-server's own POST routes and
    Ollama's generation routes."""
    return method == "POST" and (path.startswith("/v1/") or path in NATIVE_POSTS
                                 or path in OLLAMA_POSTS)


class RequestError(Exception):
    """A request swapd refuses before any upstream is involved (400, 408, 413, 503)."""

    def __init__(self, status: int, message: str, code: str, *,
                 type_: str = "invalid_request_error", retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.type = type_
        self.retry_after = retry_after


class ClientGone(Exception):
    """The client's connection broke while swapd wrote to it."""


@attrs.define(slots=True)
class Request:
    """One request's head, as the fast path read it."""

    method: str
    path: str  # percent-decoded, as routing and the key check see it
    query: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    http11: bool
    keep_alive: bool
    target: bytes  # as the client sent it
    cors: list[tuple[bytes, bytes]] = attrs.field(factory=list)  # for every answer
    preflight: bool = False  # a CORS preflight, answered by swapd itself


class BodySource(Protocol):
    """Where ``BodyReader`` reads a body from: a ``ClientConnection``."""

    declared_length: int | None

    @property
    def body_arrived(self) -> bool: ...

    def whole_body(self) -> bytes | None: ...

    async def continue_if_asked(self) -> None: ...

    async def next_body_part(self) -> bytes | None: ...


class BodyReader:
    """Reads request bodies within ``timeouts.body`` and a memory budget shared by all
    requests (``security.max_pending_bodies``).

    Without both, clients that send their headers and then stall each hold a task and
    up to ``max_body`` of memory for as long as they like. A declared Content-Length is
    reserved up front, so a body that could never fit is refused before it is read; a
    chunked body reserves as it grows. What is reserved is given back once the body is
    complete (or refused): only bodies still arriving count.
    """

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self.pending = 0
        """Bytes reserved by the bodies being received now."""

    async def read(self, conn: BodySource) -> bytes | None:
        """The whole body, or None if the client left; raises ``RequestError``: 413 too
        large, 408 not complete within ``timeouts.body``, 503 over the shared budget."""
        config = self._config()
        limit = config.security.max_body
        declared = conn.declared_length
        if declared is not None and declared > limit:
            raise _too_large(limit)
        reserved = 0

        async def collect() -> bytes | None:
            nonlocal reserved
            chunks: list[bytes] = []
            size = 0
            while True:
                data = await conn.next_body_part()
                if data is None:
                    return None
                if not data:
                    return b"".join(chunks)
                size += len(data)
                if size > limit:
                    raise _too_large(limit)
                if size > reserved:
                    reserved = self._reserve(size, reserved, config)
                chunks.append(data)

        try:
            reserved = self._reserve(declared or 0, reserved, config)
            if conn.body_arrived:  # with its head: no wait to bound
                whole = conn.whole_body()
                return whole if whole is not None else await collect()
            with trio.fail_after(config.timeouts.body):
                await conn.continue_if_asked()
                return await collect()
        except trio.TooSlowError:
            raise RequestError(408, "the request body did not arrive within "
                               f"{config.timeouts.body:g}s (timeouts.body)",
                               "body_timeout") from None
        finally:
            self.pending -= reserved

    def _reserve(self, size: int, reserved: int, config: Config) -> int:
        """Grow one body's reservation from ``reserved`` to ``size`` bytes, or refuse."""
        budget = config.security.pending_bodies_limit
        if self.pending + size - reserved > budget:
            raise RequestError(
                503, f"swapd is receiving {self.pending} bytes of other request bodies and "
                f"this one would pass security.max_pending_bodies ({budget} bytes); retry",
                "server_busy", type_="server_error", retry_after=BUSY_RETRY_AFTER)
        self.pending += size - reserved
        return size


def _too_large(limit: int) -> RequestError:
    return RequestError(413, f"request body is larger than {limit} bytes "
                        "(security.max_body)", "body_too_large")


def _parser(data: bytes = b"") -> h11.Connection:
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    if data:
        parser.receive_data(data)
    return parser


class ClientConnection:
    """One client connection: requests read from it, answers written to it, in order.

    Pipelined requests wait in the parser's buffer until the answer before them is
    complete; an answer that cannot be completed closes the connection.
    """

    def __init__(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        self.stream = stream
        self.sock = stream.socket
        self.raw = raw_socket(self.sock)  # for reads and writes: see wire.raw_socket
        self.watch = _Watch(self.sock, nursery)
        self._parser = _parser()
        self._rest: bytes | None = None  # after a body taken whole: the next request's
        self._head = b""  # the raw bytes of the current head, while it is read
        self.declared_length: int | None = None
        self.body_done = True  # False while the current request's body is unread

    async def next_request(self) -> Request | None:
        """The next request's head, or None when the client closed the connection.
        Raises ``RequestError`` for a malformed head (the connection must close then).
        The caller bounds the wait."""
        parser = self._parser
        self._head = parser.trailing_data[0]  # a pipelined request's first bytes
        event: Any = h11.NEED_DATA if not self._head else None  # nothing to parse yet
        while True:
            try:
                if event is None:
                    event = parser.next_event()
            except h11.RemoteProtocolError as error:
                if error.error_status_hint == 431:
                    raise RequestError(431, f"request head too large: {error}",
                                       "head_too_large") from None
                # h11 says 501 for a transfer coding it lacks: still the client's error
                raise RequestError(400, f"malformed request: {error}",
                                   "bad_request") from None
            if event is h11.NEED_DATA:
                try:
                    data = await recv_some(self.raw)
                except OSError:
                    return None
                if not data and not parser.trailing_data[0]:
                    return None  # closed between requests: the usual end
                self._head += data  # bounded: h11 refuses an incomplete head past it
                parser.receive_data(data)
                event = None
            elif isinstance(event, h11.Request):
                return self._request(event)
            else:  # ConnectionClosed, or a close mid-head
                return None

    def _request(self, event: h11.Request) -> Request:
        """Check what h11 lets through; a ``RequestError`` (the connection must close)
        for anything another server could read another way (request smuggling)."""
        headers = list(event.headers)
        if len(headers) > MAX_HEADERS:
            raise RequestError(431, f"more than {MAX_HEADERS} header fields", "head_too_large")
        if event.http_version not in (b"1.1", b"1.0"):
            raise RequestError(400, f"HTTP/{event.http_version.decode()} is not served here; "
                               "send HTTP/1.1", "bad_request")
        raw = self._head[:len(self._head) - len(self._parser.trailing_data[0])]
        if len(raw) > MAX_HEAD_BYTES:  # h11 limits only a head still incomplete
            raise RequestError(431, f"request head over {MAX_HEAD_BYTES} bytes",
                               "head_too_large")
        names = [name for name, _ in headers]
        problem = _framing_problem(raw, names)
        if problem is not None:
            raise RequestError(400, problem, "bad_request")
        self.declared_length = next(
            (int(value) for name, value in headers if name == b"content-length"), None)
        self.body_done = self.declared_length == 0 or (
            self.declared_length is None and b"transfer-encoding" not in names)
        raw_path, _, query = event.target.partition(b"?")
        try:
            path = unquote(raw_path.decode("ascii"), errors="strict")
        except UnicodeDecodeError:
            path = "\x00"  # refused by path_problem: no route has such a path
        http11 = event.http_version == b"1.1"
        close = any(name == b"connection" and b"close" in value.lower()
                    for name, value in headers)
        return Request(event.method.decode("ascii"), path, query, headers, http11,
                       http11 and not close, event.target)

    @property
    def body_arrived(self) -> bool:
        """The whole body of the current request has been received (read or not)."""
        return self.body_done or (self.declared_length is not None and len(
            self._parser.trailing_data[0]) >= self.declared_length)

    async def continue_if_asked(self) -> None:
        if self._parser.they_are_waiting_for_100_continue:
            await self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def next_body_part(self) -> bytes | None:
        """The next bytes of the body; b"" at its end, None if the client left."""
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await recv_some(self.raw)
                except OSError:
                    return None
                if not data:
                    return None
                parser.receive_data(data)
            elif isinstance(event, h11.Data):
                return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.body_done = True
                return b""
            else:
                return None

    def whole_body(self) -> bytes | None:
        """The body, if its Content-Length says it all arrived with the head: taken as
        it is, without a parse (what follows it is the next request's)."""
        length = self.declared_length
        buffered = self._parser.trailing_data[0]
        if length is None or len(buffered) < length or (
                self._parser.they_are_waiting_for_100_continue):
            return None
        self._rest = buffered[length:]
        self.body_done = True
        return buffered[:length]

    def next_cycle(self) -> None:
        """Ready for the next request: pipelined bytes already read are kept."""
        rest = self._parser.trailing_data[0] if self._rest is None else self._rest
        self._parser, self._rest = _parser(rest), None

    async def send(self, data: bytes) -> None:
        try:
            await send_all(self.raw, data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            raise ClientGone from None

    def handed_off_request(self, request: Request, body: bytes) -> bytes:
        """The request again, for hypercorn: body complete, and the connection to close
        after its answer (the next request must come to the fast path)."""
        version = b"HTTP/1.1" if request.http11 else b"HTTP/1.0"
        head = [request.method.encode(), b" ", request.target, b" ", version, b"\r\n"]
        head += [b"%b: %b\r\n" % (name, value) for name, value in request.headers
                 if name not in _HANDED_OFF_DROP]
        head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        return b"".join(head) + body


class _Watch:
    """Cancels the current exchange when its client goes away.

    While swapd waits for a lease, or for the model's answer, it reads nothing from the
    client: only a task waiting for the socket to become readable sees the connection
    end. One such task per connection, started on the connection's first wait, armed
    only while an exchange waits (the waits of a quick answer pass unwatched: a client
    that left is then found by the next send). Pipelined bytes make the socket readable
    too: then it cannot tell, and stops watching until the next exchange.
    """

    def __init__(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        self._sock = sock
        self._nursery: trio.Nursery | None = nursery  # until the task is started
        self._armed = trio.Event()
        self._target: Callable[[], None] | None = None
        self._scope: trio.CancelScope | None = None
        self.gone = False

    def arm(self, target: Callable[[], None]) -> None:
        """Call ``target`` if the client goes away before ``disarm``."""
        if self._target is target:
            return
        self._target = target
        self._armed.set()
        if self._nursery is not None:
            self._nursery.start_soon(self.run)
            self._nursery = None

    def disarm(self) -> None:
        """Stop watching; synchronous, so the connection's task may read at once."""
        if self._target is None:
            return
        self._target = None
        self._armed = trio.Event()
        if self._scope is not None:
            self._scope.cancel()  # unregisters the socket from trio at once

    async def run(self) -> None:
        while True:
            armed = self._armed
            await armed.wait()
            if armed is not self._armed:
                continue  # disarmed before this task ran
            with trio.CancelScope() as scope:
                self._scope = scope
                await trio.lowlevel.wait_readable(self._sock)
                try:
                    gone = not await self._sock.recv(1, socket.MSG_PEEK)
                except OSError:
                    gone = True
                if gone:
                    self.gone = True
                    if self._target is not None:
                        self._target()
                    # A write already begun finishes shielded (send_all): this ends it.
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_RDWR)
                    return
                await trio.sleep_forever()  # a pipelined request: wait to be disarmed
            self._scope = None


@attrs.define(eq=False)
class Exchange:
    """One inference request and what has been sent back for it so far."""

    conn: ClientConnection
    request: Request
    body: bytes = b""
    payload: dict[str, Any] = attrs.field(factory=dict)
    stream: bool = False
    label: str = "(none)"  # the request's model as a metrics label; "(none)" if unparsed
    headers_sent: bool = False
    status: int = 0
    started: float = attrs.field(factory=trio.current_time)
    first_byte: float | None = None
    chunked: bool = False  # the body sent is chunked (else it has a length, or closes)
    complete: bool = False  # the answer is whole: the connection may serve another
    keep_alive: bool = True
    lease: Any = None  # while it holds one
    shape: progress.StreamShape = attrs.field(factory=progress.StreamShape)
    """How this stream says what swapd has to say in-band (its API's shape)."""
    one_id: progress.OneId | None = None
    """Set once a progress chunk went out: the model's chunks then take its id."""
    _wait: trio.CancelScope | None = None  # the wait in progress, if it is watched

    def __attrs_post_init__(self) -> None:
        self.keep_alive = self.request.keep_alive

    @property
    def route(self) -> str:
        """The route the client called (metrics count it): its path."""
        return self.request.path

    def watch(self) -> None:
        """A wait begins: from now on, the client leaving ends the exchange.

        Armed only then: a scope around every exchange would cost more than the rest of
        a small request's own work here."""
        self.conn.watch.arm(self._abandon)

    def streams_while_waiting(self) -> bool:
        """Whether a wait for a load gets the early 200 and keep-alives (a streaming
        route with an in-band shape for them), or a status once it ends."""
        return self.stream and progress.shape_for(self.request.path) is not None

    def waiting(self) -> trio.CancelScope:
        """A scope for a wait (a lease, a fallback) that the client leaving cancels."""
        self.watch()
        self._wait = trio.CancelScope()
        return self._wait

    def _abandon(self) -> None:
        """The client left: stop what is done for it (its queue place, the child's
        generation); its lease goes back as the exchange unwinds."""
        if self._wait is not None:
            self._wait.cancel()
        if self.lease is not None:
            self.lease.scope.cancel()

    async def start(self, status: int, headers: Iterable[tuple[bytes, bytes]],
                    length: int | None = None, body: bytes = b"") -> None:
        """Send the head (and ``body``, the first bytes as they go on the wire)."""
        framing: list[tuple[bytes, bytes]]
        if length is not None:
            framing = [(b"content-length", b"%d" % length)]
        elif self.request.http11:
            framing = [(b"transfer-encoding", b"chunked")]
            self.chunked = True
        else:  # HTTP/1.0: the body ends with the connection
            framing = []
            self.keep_alive = False
        if not self.keep_alive:
            framing.append((b"connection", b"close"))
        framing += self.request.cors
        self.status = status
        self.headers_sent = True
        if body and self.first_byte is None:
            self.first_byte = trio.current_time()
        await self.conn.send(response_head(status, [*headers, *framing]) + body)

    async def body_part(self, data: bytes) -> None:
        if not data:
            return
        if self.first_byte is None:
            self.first_byte = trio.current_time()
        await self.conn.send(chunk(data) if self.chunked else data)

    async def end(self, data: bytes = b"") -> None:
        """Send the last bytes of the body, and its end."""
        if self.first_byte is None and data:
            self.first_byte = trio.current_time()
        if self.chunked:
            data = chunk(data) + LAST_CHUNK
        if data:
            await self.conn.send(data)
        self.complete = True

    async def relay(self, response: ChildResponse | HttpxResponse, label: str) -> str | None:
        """Pipe an upstream's answer as it comes; return what went wrong, if anything.

        A child's chunked or sized body goes to the client as the child framed it; it
        is only scanned for its end. Anything else is framed here.
        """
        try:
            if not self.headers_sent:
                headers = forwardable(response.raw_headers, _DROP_RESPONSE)
                length = response.length if isinstance(response, ChildResponse) else None
                if isinstance(response, ChildResponse) and (
                        length is not None or (response.chunked and self.request.http11)):
                    first = await response.next_wire() if response.buffered else b""
                    await self.start(response.status_code, headers, length, body=first)
                    await self._pipe(response)
                    return None
                await self.start(response.status_code, headers)
            elif response.status_code != 200:  # our 200 is out: say it in-band
                body = await response.aread()
                error = _error_object(body)
                if error is not None and self.stream and self.chunked:
                    # The upstream's own error, unchanged (a context overflow stays an
                    # exceed_context_size_error, whether the request waited or not).
                    await self.end(self.shape.upstream_error(response.status_code, error))
                    return None
                text = body.decode(errors="replace")
                return f"{label} answered {response.status_code}: {text[:500]}"
            elif self.chunked and isinstance(response, ChildResponse) and response.chunked \
                    and self.one_id is None:
                await self._pipe(response)
                return None
            same = self.one_id or (lambda data: data)
            while data := await response.next_data():
                await self.body_part(same(data))
            await self.end(self.one_id.flush() if self.one_id else b"")
        except UpstreamError as error:
            if isinstance(response, ChildResponse) and not response.at_boundary:
                self.keep_alive = False  # cut inside a chunk: nothing more can follow
                self.stream = False
            return f"{label} stopped answering: {error}"
        finally:
            await response.aclose()
        return None

    async def _pipe(self, response: ChildResponse) -> None:
        """The child's body, as it comes, in as few sends as it arrived in reads."""
        await response.pipe(self._send_body)
        self.complete = True

    async def _send_body(self, data: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = trio.current_time()
        await self.conn.send(data)

    async def fail(self, status: int, message: str, type_: str, code: str,
                   retry_after: float | None = None) -> None:
        """End the exchange with an error, in whatever form is still possible."""
        if not self.headers_sent:
            headers = [_JSON]
            if retry_after is not None:
                headers.append((b"retry-after", str(math.ceil(retry_after)).encode()))
            body = error_body(message, type_, code)
            await self.start(status, headers, length=len(body), body=body)
            self.complete = True
        elif self.stream and self.chunked and self.keep_alive:
            await self.end(self.shape.error(status, message, type_, code))
        else:  # a plain body was half sent, or the stream cut mid-chunk: close it
            log.warning("%s", message)
            self.keep_alive = self.complete = False


def _error_object(body: bytes) -> dict[str, Any] | None:
    """The ``error`` object of an OpenAI-shaped error body, or None."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else None


def error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


def forwardable(headers: Iterable[tuple[bytes, bytes]],
                drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """``headers`` less ``drop`` and less any header the Connection header names."""
    headers = list(headers)
    named = {token.strip().lower() for name, value in headers if name.lower() == b"connection"
             for token in value.split(b",")}
    return [(k, v) for k, v in headers if k.lower() not in drop and k.lower() not in named]


class _Replay(trio.abc.HalfCloseableStream):
    """A client's connection as hypercorn gets it: the request swapd already read
    comes first, then whatever the client sends next."""

    def __init__(self, stream: trio.SocketStream, data: bytes) -> None:
        self._stream = stream
        self._data = data
        self.socket = stream.socket  # hypercorn reads the client's address from it

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._data:
            data, self._data = self._data, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


Handler = Callable[[Exchange], Awaitable[None]]


class FastPath:
    """Serves swapd's connections: inference here, the rest through hypercorn."""

    def __init__(self, config: Callable[[], Config],
                 allows: Callable[[str, list[tuple[bytes, bytes]]], bool],
                 inference: Handler, app: Any, hypercorn: HypercornConfig) -> None:
        self._config = config
        self._allows = allows
        self._inference = inference
        self.bodies = BodyReader(config)
        self.app = wrap_app(app, hypercorn.wsgi_max_body_size, None)
        self._hypercorn = hypercorn
        self._context = WorkerContext(None)
        self._state: dict[str, Any] = {}  # the ASGI lifespan state, shared by requests
        self._idle: set[trio.CancelScope] = set()
        self.draining = False
        self._cors: tuple[Config | None, cors.Policy] = (None, cors.Policy())

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Serve one client connection until it closes (or goes to hypercorn).

        Whatever goes wrong in it ends this connection, never the server: an error no
        code path expected is logged with its traceback and the connection closed.
        """
        try:
            await self._serve_connection(stream)
        except* Exception as group:
            log.error("a connection ended on an unexpected error; swapd goes on",
                      exc_info=group)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                conn = ClientConnection(stream, nursery)
                try:
                    await self._serve_requests(conn)
                except* ClientGone:
                    pass  # also from a task of the exchange (load progress): a group
                finally:
                    nursery.cancel_scope.cancel()  # the watcher, if it runs
                    close_raw(conn.raw)
        finally:
            stream.socket.close()

    async def _serve_requests(self, conn: ClientConnection) -> None:
        while (request := await self._next_request(conn)) is not None:
            if request.preflight:
                if not await self._answer_preflight(conn, request):
                    return
                conn.next_cycle()
                continue
            if not is_inference(request.method, request.path):
                await self._hand_off(conn, request)
                return
            if not await self._serve_inference(conn, request):
                return
            conn.next_cycle()

    async def _next_request(self, conn: ClientConnection) -> Request | None:
        """The next request that passed the checks every route needs; None once the
        connection is done (closed, idle too long, refused, or swapd is draining)."""
        if self.draining:
            return None
        request = None
        # One scope: the deadline on the head (timeouts.headers), and the cancel that
        # closes an idle connection when swapd drains.
        with trio.CancelScope(deadline=trio.current_time() + self._config().timeouts.headers
                              ) as idle:
            self._idle.add(idle)
            try:
                request = await conn.next_request()
            except RequestError as error:
                await _refuse(conn, error)
                return None
            finally:
                self._idle.discard(idle)
        if request is None or idle.cancelled_caught:
            return None
        policy = self._cors_policy()
        if not policy.off:
            request.cors = cors.answer_headers(policy, request.headers)
        request.preflight = cors.is_preflight(request.method, request.headers)
        refusal = self._refusal(request)
        if refusal is not None:
            await _refuse(conn, refusal, cors_headers=request.cors, path=request.path)
            return None
        return request

    def _cors_policy(self) -> cors.Policy:
        """The CORS policy of the config in force (worked out again after a reload)."""
        config = self._config()
        if self._cors[0] is not config:
            self._cors = (config, cors.policy(config))
        return self._cors[1]

    async def _answer_preflight(self, conn: ClientConnection, request: Request) -> bool:
        """204 with what the page may send, or 403 for an origin not allowed; no key is
        needed (a browser never sends one on a preflight). Whether the connection may
        serve another request."""
        try:
            body = await self.bodies.read(conn)  # a preflight has none; any is dropped
        except RequestError as error:
            await _refuse(conn, error)
            return False
        if body is None:
            return False
        headers = cors.preflight_headers(self._cors_policy(), request.headers)
        if headers is None:
            await _refuse(conn, RequestError(
                403, "this page's origin may not call swapd: add it to cors.allow_origins",
                "origin_not_allowed"), keep_alive=request.keep_alive)
            return request.keep_alive
        if not request.keep_alive:
            headers.append((b"connection", b"close"))
        await conn.send(response_head(204, headers))
        return request.keep_alive

    def _refusal(self, request: Request) -> RequestError | None:
        """What every route refuses: a WebSocket upgrade (no route is one), a path any
        layer could read differently (before the key check, so both see one path), a
        missing key (a CORS preflight needs none). Other upgrades (h2c) are ignored:
        the answer is HTTP/1.1."""
        if any(name == b"upgrade" and b"websocket" in value.lower()
               for name, value in request.headers):
            return RequestError(403, "swapd serves no WebSocket", "websocket_refused")
        problem = path_problem(request.path)
        if problem is not None:
            return RequestError(400, problem, "invalid_path")
        if not request.preflight and not self._allows(request.path, request.headers):
            return RequestError(401, "missing or invalid API key: send it as "
                                "'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                                "invalid_api_key")
        return None

    async def _serve_inference(self, conn: ClientConnection, request: Request) -> bool:
        """Serve one inference request; whether the connection may serve another."""
        try:
            body = await self.bodies.read(conn)
        except RequestError as error:
            await _refuse(conn, error, keep_alive=request.keep_alive and conn.body_done,
                          cors_headers=request.cors, path=request.path)
            return request.keep_alive and conn.body_done
        if body is None:
            return False  # the client left before it finished sending
        exchange = Exchange(conn, request, body)
        try:
            await self._inference(exchange)
        finally:
            conn.watch.disarm()
        return exchange.complete and exchange.keep_alive and not conn.watch.gone

    async def _hand_off(self, conn: ClientConnection, request: Request) -> None:
        """Give the connection, with this request read again, to hypercorn."""
        try:
            body = await self.bodies.read(conn)
        except RequestError as error:
            await _refuse(conn, error, cors_headers=request.cors, path=request.path)
            return
        if body is None:
            return
        replay = _Replay(conn.stream, conn.handed_off_request(request, body))
        await TCPServer(self.app, self._hypercorn, self._context,
                        ConnectionState(self._state.copy()),
                        replay).run()  # type: ignore[arg-type]  # any HTTP/1 stream serves

    async def serve(self, shutdown_trigger: Callable[[], Awaitable[None]], *,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Listen, serve until ``shutdown_trigger`` returns, then drain.

        Draining: no new connection is accepted, idle connections close at once, and
        requests in flight (here and in hypercorn) get ``timeouts.drain`` to finish.
        """
        config = self._hypercorn
        sockets = config.create_sockets()
        listeners = []
        urls = []
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            urls.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
        lifespan = Lifespan(self.app, config, self._state)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(partial(trio.serve_listeners, self.serve_connection,
                                                 listeners, handler_nursery=connections))
                    task_status.started(urls)
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()
                for listener in listeners:
                    await listener.aclose()
                await self.drain()
                connections.cancel_scope.deadline = (trio.current_time()
                                                     + config.graceful_timeout)
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()

    async def drain(self) -> None:
        """Close idle connections now; the busy ones close after their answer."""
        self.draining = True
        for scope in list(self._idle):
            scope.cancel()
        await self._context.terminated.set()  # hypercorn's idle connections close too


async def _refuse(conn: ClientConnection, error: RequestError, keep_alive: bool = False,
                  cors_headers: list[tuple[bytes, bytes]] | None = None,
                  path: str = "") -> None:
    """Answer a refused request with its JSON error; the connection closes unless told.
    ``cors_headers``: the request's CORS headers, so that a page can read why; ``path``:
    Ollama's routes get Ollama's error shape."""
    headers = [_JSON, *(cors_headers or ())]
    if error.retry_after is not None:
        headers.append((b"retry-after", b"%d" % error.retry_after))
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if not keep_alive:
        headers.append((b"connection", b"close"))
    body = (json.dumps({"error": str(error)}).encode() if is_ollama_path(path)
            else error_body(str(error), error.type, error.code))
    headers.append((b"content-length", b"%d" % len(body)))
    await conn.send(response_head(error.status, headers) + body)
