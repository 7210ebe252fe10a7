"""A lean HTTP/1.1 client for the one place it matters: requests to the local child.

Every proxied request pays for its upstream client once per request and once per
chunk. httpx costs about 1.3 ms of CPU per small request on these machines; the same
exchange over a raw trio socket costs about 0.1 ms (``bench/README.md``). So the
inference hot path talks to llama-server through this module: keep-alive connections
on loopback, plain HTTP/1.1, nothing else. httpx still does everything that is not per
request (health polls, ``/props``, slot saves) and every remote fallback (TLS, proxies).

``ChildPool`` keeps idle connections for ``keepalive_expiry`` seconds (llama-server
closes them after 5). A request that fails on a reused connection before any byte of
the answer arrived is sent once more on a fresh one: the server closed it while it was
idle and never saw the request.

A hung child must not hang its clients: each wait for bytes of an answer has a deadline,
``first_byte_timeout`` until the first byte of the body (llama-server sends nothing while
it processes the prompt, nor before a non-streamed answer is complete) and
``idle_timeout`` between reads after that. ``ChildPool.last_heard`` is when the child
last sent anything, so its liveness probe can skip a child that is visibly busy.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import httpx
import trio

from swapd.config import host_port
from swapd.net.wire import ChunkScanner, FramingError, close_raw, raw_socket, send_some, wait_recv

RECEIVE_SIZE = 65536

MAX_HEAD = 64 * 1024
"""Largest answer head accepted from a child (llama-server's are a few hundred bytes)."""

REMOTE_ANSWER_CLOSE_TIMEOUT = 1.0
"""Closing a remote fallback's answer (httpx), shielded, so it must be bounded."""


class UpstreamError(Exception):
    """The upstream could not be reached, or broke the exchange."""


class UpstreamTimeout(UpstreamError):
    """The upstream sent nothing for longer than its deadline allows."""


class _ClosedIdle(UpstreamError):
    """The connection ended before any byte of an answer: the server closed it idle."""


WAIT_AFTER = 0.002
"""A read that has had nothing for this long is a wait: the answer's ``on_wait`` is
called (once), for a caller with something to do only when waits get long."""

OnWait = Callable[[], None]


class _Once:
    """``on_wait``, called at most once: after that, reads need no extra deadline."""

    __slots__ = ("call",)

    def __init__(self, call: OnWait | None) -> None:
        self.call = call

    def __call__(self) -> None:
        call, self.call = self.call, None
        if call is not None:
            call()


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.raw = raw_socket(stream.socket)  # for every read and write
        self.idle_since = 0.0
        self.reused = False
        self.waited = False  # the last read had to wait: the next one waits first

    async def recv(self, within: float, on_wait: _Once | None = None) -> bytes:
        """The next bytes (b"" at EOF); ``trio.TooSlowError`` if none for ``within`` s.

        ``on_wait`` is called if nothing came for ``WAIT_AFTER`` seconds."""
        raw = self.raw
        if not self.waited:  # the last read found bytes there: so may this one
            try:
                data = raw.recv(RECEIVE_SIZE)
            except BlockingIOError:
                self.waited = True
            else:
                # Bytes at every read must not starve the other tasks; shielded, so a
                # cancel cannot lose the bytes just read.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        data = await self._wait_recv(within, on_wait)
        # A paced stream finds nothing at every read: it waits first, without a failed
        # read (and its exception) each time, until a read finds more than one piece.
        self.waited = len(data) < RECEIVE_SIZE // 16
        return data

    async def _wait_recv(self, within: float, on_wait: _Once | None) -> bytes:
        raw = self.raw
        # Bare scopes: fail_after's context manager costs a third more per wait.
        if on_wait is not None and on_wait.call is not None and within > WAIT_AFTER:
            with trio.CancelScope(deadline=trio.current_time() + WAIT_AFTER):
                return await wait_recv(raw, RECEIVE_SIZE)
            on_wait()
            within -= WAIT_AFTER
        if within == math.inf:
            return await wait_recv(raw, RECEIVE_SIZE)
        with trio.CancelScope(deadline=trio.current_time() + within):
            return await wait_recv(raw, RECEIVE_SIZE)
        raise trio.TooSlowError  # reached only when the deadline cancelled the read


_NO_BODY_STATUS = frozenset({204, 304})


class ChildResponse:
    """An answer being read; give the connection back with ``aclose`` (always).

    Its body is read either as it is on the wire (``next_wire``: chunk framing and all,
    for relaying it as is) or decoded (``next_data``, ``aiter_raw``, ``aread``).
    """

    def __init__(self, pool: ChildPool, connection: _Connection, status_code: int,
                 headers: list[tuple[bytes, bytes]], rest: bytes,
                 first_byte_timeout: float = math.inf,
                 idle_timeout: float = math.inf, on_wait: _Once | None = None) -> None:
        self.status_code = status_code
        self._on_wait = on_wait
        self.raw_headers = headers
        self.idle_timeout = idle_timeout
        self._pool = pool
        self._connection: _Connection | None = connection
        self._heard = trio.current_time()  # when the child last sent a byte of it
        self._pending = rest
        self._timeout, self._setting = ((idle_timeout, "timeouts.upstream_idle") if rest
                                        else (first_byte_timeout, "timeouts.first_byte"))
        framing = _framing(status_code, headers)
        self.chunked = framing == "chunked"
        self._scanner = ChunkScanner() if self.chunked else None
        self._left: int | None = framing if isinstance(framing, int) else None
        self._keep_alive = framing != "close" and not any(
            name == b"connection" and b"close" in value.lower() for name, value in headers)
        self._complete = self._left == 0
        # llama-server closes the connection after every streamed answer, though its
        # headers say keep-alive: pooling it would only cost a failed send and a retry.
        self.streamed = any(name == b"content-type" and b"event-stream" in value
                            for name, value in headers)

    @property
    def complete(self) -> bool:
        """The whole answer has been read."""
        return self._complete

    @property
    def buffered(self) -> bool:
        """Bytes of the body arrived with the head: ``next_wire`` returns them at once."""
        return bool(self._pending)

    @property
    def at_boundary(self) -> bool:
        """Nothing of the body is half relayed: no chunk is cut where the relay stands."""
        return self._scanner is None or self._scanner.at_boundary

    @property
    def length(self) -> int | None:
        """The body's declared length; None when chunked or until the connection ends."""
        return self._left if not self.chunked else None

    async def pipe(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """Send what is left of the body, as it is on the wire, through ``send``.

        One deadline for the whole relay instead of one per read (a cancel scope per
        read cost a fifth of a relayed chunk's CPU here). It is moved forward only once
        a quarter of the timeout has passed; when it fires early (bytes came since),
        the relay goes on under a new one. A cancel reaches ``send`` only before its
        first byte (``wire.send_all``), so the bytes it held are sent again then.
        A silence of the whole timeout raises ``UpstreamTimeout``, as ``next_wire``.
        """
        pending = b""
        if self._complete:
            return
        while True:
            with trio.CancelScope(deadline=self._heard + self._timeout) as timer:
                while True:
                    if pending:
                        await send(pending)
                        pending = b""
                    pending = await self.next_wire(within=math.inf)
                    if not pending:
                        return
                    due = self._heard + self._timeout
                    if due < timer.deadline or due > timer.deadline + self._timeout / 4:
                        timer.deadline = due  # in: the first byte came; out: bytes flow
            if trio.current_time() - self._heard >= self._timeout:
                raise UpstreamTimeout(
                    f"it sent nothing for {self._timeout:g}s ({self._setting})")

    async def next_wire(self, decode: bool = False, within: float | None = None) -> bytes:
        """The next bytes of the body as framed on the wire; b"" once it is complete.

        With ``decode``, the payload of those bytes instead (b"" too when they held only
        framing: check ``complete``). ``within`` replaces the answer's own deadline
        for this read.
        """
        if self._complete:
            return b""
        data, self._pending = self._pending, b""
        if not data:
            connection = self._connection
            assert connection is not None, "the answer was already closed"
            try:
                data = await connection.recv(self._timeout if within is None else within,
                                             self._on_wait)
            except trio.TooSlowError:
                raise UpstreamTimeout(
                    f"it sent nothing for {self._timeout:g}s ({self._setting})") from None
            except (trio.ClosedResourceError, OSError) as error:
                raise UpstreamError(f"the answer broke off: {error}") from None
            if not data:
                if self._left is None and self._scanner is None:  # ends with the connection
                    self._complete = True
                    return b""
                raise UpstreamError("the connection closed before the answer ended")
            self._pool.last_heard = self._heard = trio.current_time()
            self._timeout, self._setting = self.idle_timeout, "timeouts.upstream_idle"
        scanner = self._scanner
        if scanner is not None:
            try:
                used = scanner.scan(data, decode)
            except FramingError as error:
                raise UpstreamError(f"the answer broke off: {error}") from None
            if scanner.done:
                self._complete = True
                if used < len(data):
                    self._keep_alive = False  # bytes past the answer: never reuse
                data = data[:used]
            if decode:
                data = b"".join(scanner.payload)
                scanner.payload.clear()
        elif self._left is not None:
            if len(data) >= self._left:
                self._keep_alive = self._keep_alive and len(data) == self._left
                data, self._complete = data[:self._left], True
            self._left -= len(data)
        return data

    async def next_data(self) -> bytes:
        """The next decoded bytes of the body; b"" once it is complete."""
        while not self._complete:
            data = await self.next_wire(decode=True)
            if data:
                return data
        return b""

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while data := await self.next_data():
            yield data

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._complete and self._keep_alive and not self.streamed:
            self._pool.give_back(connection)
        else:  # half read: the rest of the answer is still on the wire
            _close(connection)


def _framing(status: int, headers: list[tuple[bytes, bytes]]) -> int | str:
    """How the body ends: a length, "chunked", or "close" (when the connection does)."""
    if status in _NO_BODY_STATUS:
        return 0
    length: int | str = "close"
    for name, value in headers:
        if name == b"transfer-encoding":
            return "chunked" if value.lower().rstrip().endswith(b"chunked") else "close"
        if name == b"content-length":
            if not value.strip().isdigit():
                raise UpstreamError(f"invalid Content-Length {value[:40]!r} in the answer")
            length = int(value)
    return length


def _parse_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    status_line, *lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError(f"not an HTTP/1.1 answer: {status_line[:60]!r}")
    headers = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            raise UpstreamError(f"malformed header line in the answer: {line[:60]!r}")
        headers.append((name.strip().lower(), value.strip()))
    return int(parts[1]), headers


class ChildPool:
    """Keep-alive connections to one llama-server."""

    def __init__(self, host: str, port: int, *, keepalive_expiry: float = 4.0,
                 max_idle: int = 64, connect_timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._host_line = b"host: " + host_port(host, port).encode() + b"\r\n"
        self._family = _family(host)
        self._idle: list[_Connection] = []
        self._closed = False
        self.last_heard = trio.current_time()
        """When the child last sent a byte of an answer's head or body."""

    async def request(self, method: bytes | str, target: bytes | str,
                      headers: Iterable[tuple[bytes, bytes]], body: bytes, *,
                      first_byte_timeout: float = math.inf,
                      idle_timeout: float = math.inf,
                      on_wait: OnWait | None = None) -> ChildResponse:
        """Send a request with a complete body; return once the answer's head is in.

        Each wait for the head, then for the first byte of the body, may last
        ``first_byte_timeout``; later waits ``idle_timeout``. A silence longer than
        that raises ``UpstreamTimeout`` (an ``UpstreamError``). ``on_wait`` is called,
        once, the first time a read of the answer has to wait (``WAIT_AFTER``).
        ``headers`` must be valid header fields (the fast path's parser checked the
        client's).
        """
        if isinstance(method, str):
            method = method.encode("ascii")
        if isinstance(target, str):
            target = target.encode("ascii")
        data = b"".join([method, b" ", target, b" HTTP/1.1\r\n", self._host_line,
                         b"content-length: %d\r\n" % len(body),
                         *[b"%b: %b\r\n" % pair for pair in headers], b"\r\n", body])
        once = _Once(on_wait) if on_wait is not None else None
        while True:
            connection = await self._checkout()
            try:
                await _send(connection.raw, data, first_byte_timeout)
                status, head, rest = await self._read_head(connection, first_byte_timeout,
                                                           once)
            except (_ClosedIdle, trio.BrokenResourceError, OSError) as error:
                _close(connection)
                if connection.reused:
                    continue  # closed by the server while idle: it never saw this request
                raise UpstreamError(f"no answer from {self.host}:{self.port}: "
                                    f"{error or type(error).__name__}") from None
            except trio.TooSlowError:
                _close(connection)
                raise UpstreamTimeout(f"no answer within {first_byte_timeout:g}s "
                                      "(timeouts.first_byte)") from None
            except BaseException:
                _close(connection)
                raise
            self.last_heard = trio.current_time()
            return ChildResponse(self, connection, status, head, rest, first_byte_timeout,
                                 idle_timeout, once)

    @staticmethod
    async def _read_head(connection: _Connection, within: float, on_wait: _Once | None,
                         ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The answer's status, headers and the bytes after them; 1xx answers skipped."""
        data = b""
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    raise UpstreamError(f"the answer's head is over {MAX_HEAD} bytes")
                more = await connection.recv(within, on_wait)
                if not more:
                    if data:
                        raise UpstreamError("the connection closed inside the answer's head")
                    raise _ClosedIdle("the connection closed before an answer")
                data += more
                continue
            status, headers = _parse_head(data[:end])
            data = data[end + 4:]
            if status >= 200 or status == 101:
                return status, headers, data

    async def _connect(self) -> trio.SocketStream:
        """A new connection. To an IP address (the usual child) a plain connect:
        ``open_tcp_stream`` costs a nursery and a task per attempt (happy eyeballs),
        and llama-server closes the connection after every streamed answer."""
        if self._family is None:
            return await trio.open_tcp_stream(self.host, self.port)
        sock = trio.socket.socket(self._family, socket.SOCK_STREAM)
        try:
            await sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)  # sets TCP_NODELAY

    def give_back(self, connection: _Connection) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            _close(connection)
            return
        connection.idle_since = trio.current_time()
        connection.reused = True
        self._idle.append(connection)

    async def aclose(self) -> None:
        """Close the idle connections; busy ones close when their answer is done."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            _close(connection)
        await trio.lowlevel.checkpoint()

    async def _checkout(self) -> _Connection:
        now = trio.current_time()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: least likely expired
            if now - connection.idle_since < self.keepalive_expiry:
                return connection
            _close(connection)
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await self._connect()
        except (OSError, trio.TooSlowError) as error:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: "
                                f"{error or type(error).__name__}") from None
        return _Connection(stream)


def _family(host: str) -> socket.AddressFamily | None:
    """The address family of an IP address; None for a name (to be resolved)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


async def _send(raw: socket.socket, data: bytes, within: float) -> None:
    """Write a request; ``trio.TooSlowError`` if a child does not take it within
    ``within`` seconds (a stopped one reads nothing). One ``send``, and no deadline to
    set up, when the socket takes it all at once: the usual case."""
    sent = send_some(raw, data)
    if sent < len(data):
        view = memoryview(data)[sent:]
        with trio.CancelScope(deadline=trio.current_time() + within):
            while view:
                await trio.lowlevel.wait_writable(raw)
                view = view[send_some(raw, view):]
        if view:
            raise trio.TooSlowError
    else:
        await trio.lowlevel.checkpoint()


def _close(connection: _Connection) -> None:
    """Closing a socket needs no waiting: no shield, nothing to bound."""
    close_raw(connection.raw)
    connection.stream.socket.close()


class HttpxResponse:
    """An httpx response (remote fallbacks) in ``ChildResponse``'s shape, so one relay
    serves both, with httpx's errors as ``UpstreamError``."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code: int = response.status_code
        self.raw_headers: list[tuple[bytes, bytes]] = [
            (name.lower(), value) for name, value in response.headers.raw]
        self._chunks = self.aiter_raw()

    async def next_data(self) -> bytes:
        """The next decoded bytes of the body; b"" once it is complete."""
        return await anext(self._chunks, b"")

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as error:
            raise UpstreamError(f"{type(error).__name__}: {error}") from None

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(REMOTE_ANSWER_CLOSE_TIMEOUT):
            await self._response.aclose()
