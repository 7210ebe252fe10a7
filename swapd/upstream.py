"""A lean HTTP/1.1 client for the one place it matters: requests to the local child.

Every proxied request pays for its upstream client once per request and once per
chunk. httpx costs about 1.3 ms of CPU per small request on these machines; the same
exchange over h11 and a trio stream costs about 0.3 ms (``bench/README.md``). So the
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

import math
from collections.abc import AsyncIterator, Iterable
from typing import Any

import h11
import httpx
import trio

from .config import host_port

RECEIVE_SIZE = 65536

REMOTE_ANSWER_CLOSE_TIMEOUT = 1.0
"""Closing a remote fallback's answer (httpx), shielded, so it must be bounded."""


class UpstreamError(Exception):
    """The upstream could not be reached, or broke the exchange."""


class UpstreamTimeout(UpstreamError):
    """The upstream sent nothing for longer than its deadline allows."""


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.reused = False

    async def next_event(self, within: float = math.inf) -> Any:
        """The next h11 event; ``trio.TooSlowError`` if no byte came for ``within`` s."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if within == math.inf:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            else:  # a bare scope: fail_after's context manager costs a third more per read
                with trio.CancelScope(deadline=trio.current_time() + within) as scope:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                if scope.cancelled_caught:
                    raise trio.TooSlowError
            self.h11.receive_data(data)  # b"" marks EOF: h11 turns it into an error/close

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE


class ChildResponse:
    """An answer being read; give the connection back with ``aclose`` (always)."""

    def __init__(self, pool: ChildPool, connection: _Connection, response: h11.Response,
                 first_byte_timeout: float = math.inf,
                 idle_timeout: float = math.inf) -> None:
        self.status_code: int = response.status_code
        self.raw_headers: list[tuple[bytes, bytes]] = list(response.headers)
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self._pool = pool
        self._connection: _Connection | None = connection
        self._complete = False
        # llama-server closes the connection after every streamed answer, though its
        # headers say keep-alive: pooling it would only cost a failed send and a retry.
        self._streamed = any(name.lower() == b"content-type" and b"event-stream" in value
                             for name, value in self.raw_headers)

    @property
    def complete(self) -> bool:
        """The whole answer has been read."""
        return self._complete

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        connection = self._connection
        assert connection is not None, "the answer was already read or closed"
        timeout, setting = self.first_byte_timeout, "timeouts.first_byte"
        while True:
            try:
                event = await connection.next_event(timeout)
            except (h11.RemoteProtocolError, trio.BrokenResourceError,
                    trio.ClosedResourceError, OSError) as error:
                raise UpstreamError(f"the answer broke off: {error}") from None
            except trio.TooSlowError:
                raise UpstreamTimeout(f"it sent nothing for {timeout:g}s ({setting})") from None
            if isinstance(event, h11.Data):
                # Take what h11 already holds too: tokens that arrived together leave
                # together, one downstream send instead of one each.
                data = bytes(event.data)
                while isinstance(event := connection.h11.next_event(), h11.Data):
                    data += event.data
                self._pool.last_heard = trio.current_time()
                timeout, setting = self.idle_timeout, "timeouts.upstream_idle"
                yield data
                if isinstance(event, h11.EndOfMessage):
                    self._complete = True
                    return
                if event is not h11.NEED_DATA:
                    raise UpstreamError(f"unexpected {type(event).__name__} in the answer")
            elif isinstance(event, h11.EndOfMessage):
                self._complete = True
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise UpstreamError("the connection closed before the answer ended")

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    def abort(self) -> None:
        """Close the connection now, from any task: the child stops generating."""
        connection, self._connection = self._connection, None
        if connection is not None:
            _close(connection)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._complete and connection.reusable and not self._streamed:
            connection.h11.start_next_cycle()
            self._pool.give_back(connection)
        else:  # half read: the rest of the answer is still on the wire
            _close(connection)


class ChildPool:
    """Keep-alive connections to one llama-server."""

    def __init__(self, host: str, port: int, *, keepalive_expiry: float = 4.0,
                 max_idle: int = 64, connect_timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._host_header = host_port(host, port).encode()
        self._idle: list[_Connection] = []
        self._closed = False
        self.last_heard = trio.current_time()
        """When the child last sent a byte of an answer's head or body."""

    async def request(self, method: bytes | str, target: bytes | str,
                      headers: Iterable[tuple[bytes, bytes]], body: bytes, *,
                      first_byte_timeout: float = math.inf,
                      idle_timeout: float = math.inf) -> ChildResponse:
        """Send a request with a complete body; return once the answer's head is in.

        Each wait for the head, then for the first byte of the body, may last
        ``first_byte_timeout``; later waits ``idle_timeout``. A silence longer than
        that raises ``UpstreamTimeout`` (an ``UpstreamError``).
        """
        headers = [(b"host", self._host_header),
                   (b"content-length", str(len(body)).encode()), *headers]
        request = h11.Request(method=method, target=target, headers=headers)
        while True:
            connection = await self._checkout()
            try:
                data = connection.h11.send(request) or b""
                if body:
                    data += connection.h11.send(h11.Data(data=body)) or b""
                data += connection.h11.send(h11.EndOfMessage()) or b""
                with trio.fail_after(first_byte_timeout):  # a stopped child reads nothing
                    await connection.stream.send_all(data)
                event = await connection.next_event(first_byte_timeout)
                while isinstance(event, h11.InformationalResponse):
                    event = await connection.next_event(first_byte_timeout)
            except (h11.RemoteProtocolError, trio.BrokenResourceError, OSError) as error:
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
            if not isinstance(event, h11.Response):
                _close(connection)
                raise UpstreamError(f"unexpected {type(event).__name__} from the upstream")
            self.last_heard = trio.current_time()
            return ChildResponse(self, connection, event, first_byte_timeout, idle_timeout)

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
                stream = await trio.open_tcp_stream(self.host, self.port)
        except (OSError, trio.TooSlowError) as error:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: "
                                f"{error or type(error).__name__}") from None
        return _Connection(stream)


def _close(connection: _Connection) -> None:
    """Closing a socket needs no waiting: no shield, nothing to bound."""
    connection.stream.socket.close()


class HttpxResponse:
    """An httpx response (remote fallbacks) in ``ChildResponse``'s shape, so one relay
    serves both, with httpx's errors as ``UpstreamError``."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code: int = response.status_code
        self.raw_headers: list[tuple[bytes, bytes]] = list(response.headers.raw)

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
