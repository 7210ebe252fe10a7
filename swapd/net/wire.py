"""HTTP/1.1 framing that the data plane handles as bytes, in both directions.

The fast path relays llama-server's answers without decoding and re-encoding them: a
chunked body goes to the client exactly as the child framed it, and only its chunk sizes
are read, to find where it ends (``ChunkScanner``). The same scanner decodes a chunked
body where the bytes themselves are needed (an in-band error, an HTTP/1.0 client).
Heads swapd writes itself are built here too, as one ``bytes`` each.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from http import HTTPStatus

import trio

MAX_CHUNK_LINE = 4096
"""Longest chunk-size line (size and extensions) or trailer line accepted from a peer."""

MAX_TRAILERS = 16 * 1024
"""Most bytes of trailer fields accepted after the last chunk."""


class FramingError(Exception):
    """A peer's chunked body is malformed."""


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

_CHUNK_LINE = re.compile(rb"([0-9a-fA-F]{1,16})(?:;[^\r\n]*)?\r\n")
"""A whole chunk-size line: the size, any extensions, CRLF."""


class ChunkScanner:
    """Follows a chunked body across reads: where it ends and, if asked, what it says.

    ``scan`` returns how many bytes of ``data`` belong to the body (all of them until
    the end arrives); with ``decode=True`` it also collects the payload, less the framing,
    in ``payload``. A read never needs the bytes of an earlier one again: a chunk-size
    line split across two reads is the only thing kept between calls.
    """

    __slots__ = ("_left", "_line", "_state", "_trailers", "payload")

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0  # bytes of chunk data (or of the CRLF after it) still to come
        self._line = b""  # a line split between reads
        self._trailers = 0
        self.payload: list[bytes] = []

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def at_boundary(self) -> bool:
        """Between chunks: what was scanned so far is whole chunks."""
        return self._state in (_SIZE, _DONE) and not self._line

    def scan(self, data: bytes, decode: bool = False) -> int:
        """The number of bytes of ``data`` that are this body's (``len(data)`` unless the
        body ends inside it). Raises ``FramingError`` on malformed framing."""
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _SIZE and not self._line:
                # The usual read: whole chunks from a boundary, each found by one match.
                match = _CHUNK_LINE.match(data, pos)
                if match is not None:
                    size = int(match.group(1), 16)
                    start, stop = match.end(), match.end() + size
                    if size and data.startswith(b"\r\n", stop):
                        if decode:
                            self.payload.append(data[start:stop])
                        pos = stop + 2
                        continue
                    self._state, self._left = (_DATA, size) if size else (_TRAILER, 0)
                    pos = start
                    continue
                # else a line split between reads, or malformed: the general path says
            if state == _DATA:
                take = min(self._left, end - pos)
                if decode:
                    self.payload.append(data[pos:pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state, self._left = _DATA_END, 2
            elif state == _DATA_END:  # the CRLF after a chunk's data
                take = min(self._left, end - pos)
                if data[pos:pos + take] != b"\r\n"[2 - self._left:2 - self._left + take]:
                    raise FramingError("a chunk's data is not followed by CRLF")
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _SIZE
            elif state == _DONE:
                return pos
            else:  # a line: a chunk size, or a trailer field
                newline = data.find(b"\n", pos)
                if newline < 0:
                    self._line += data[pos:]
                    if len(self._line) > MAX_CHUNK_LINE:
                        raise FramingError("a chunk-size line is too long")
                    return end
                line = self._line + data[pos:newline + 1]
                self._line = b""
                pos = newline + 1
                if not line.endswith(b"\r\n") or len(line) > MAX_CHUNK_LINE:
                    raise FramingError(f"malformed chunk line {line[:40]!r}")
                if state == _SIZE:
                    self._chunk_size(line)
                elif line == b"\r\n":
                    self._state = _DONE
                else:
                    self._trailers += len(line)
                    if self._trailers > MAX_TRAILERS:
                        raise FramingError("the trailer fields are too large")
        return pos

    def _chunk_size(self, line: bytes) -> None:
        size = line[:-2].split(b";", 1)[0].strip(b" \t")
        if not size or size.strip(b"0123456789abcdefABCDEF"):
            raise FramingError(f"malformed chunk size {size[:40]!r}")
        self._left = int(size, 16)
        self._state = _DATA if self._left else _TRAILER


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (nothing for empty data: that would end it)."""
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"


_STATUS_LINES = {status.value: b"HTTP/1.1 %d %b\r\n" % (status.value, status.phrase.encode())
                 for status in HTTPStatus}


def response_head(status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A response head: status line, ``headers`` as given, the blank line."""
    line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status
    return line + b"".join(b"%b: %b\r\n" % pair for pair in headers) + b"\r\n"


FINISH_SEND_TIMEOUT = 30.0
"""A write that has begun is finished, shielded from cancellation, within this long."""


def raw_socket(sock: trio.socket.SocketType) -> socket.socket:
    """A stdlib socket on a duplicate of ``sock``'s descriptor, for the data plane's
    reads and writes: called directly, they skip the two checkpoints and the wrapping
    each call through trio's socket makes (a third of a relayed chunk's CPU here), and
    the task waits only when the socket says so (``trio.lowlevel.wait_*``). Close it
    with ``close_raw``; the trio socket is closed on its own."""
    raw = socket.fromfd(sock.fileno(), sock.family, sock.type)
    raw.setblocking(False)
    return raw


def close_raw(raw: socket.socket) -> None:
    """Close a ``raw_socket``, waking any task that waits on it."""
    if raw.fileno() >= 0:
        trio.lowlevel.notify_closing(raw)
        raw.close()


async def recv_some(raw: socket.socket, size: int = 65536) -> bytes:
    """The next bytes from a nonblocking socket (b"" at EOF), waiting only if none are
    there yet; bytes already there come after a checkpoint that cannot lose them."""
    try:
        data = raw.recv(size)
    except BlockingIOError:
        return await wait_recv(raw, size)
    await trio.lowlevel.cancel_shielded_checkpoint()  # bytes at every read: let others run
    return data


async def wait_recv(raw: socket.socket, size: int) -> bytes:
    """``recv_some`` once a read found nothing: wait for the socket, then read."""
    while True:
        await trio.lowlevel.wait_readable(raw)
        try:
            return raw.recv(size)
        except BlockingIOError:
            continue  # woken for nothing (rare): wait again


def send_some(raw: socket.socket, data: bytes | memoryview) -> int:
    """What a nonblocking socket takes of ``data`` now (0 when it takes nothing)."""
    try:
        return raw.send(data)
    except BlockingIOError:
        return 0


async def send_all(raw: socket.socket, data: bytes) -> None:
    """Write all of ``data``: one ``send`` and no wait in the usual case.

    A cancel may stop the write only before its first byte: a message cut halfway would
    leave the connection's framing broken (a progress line cut by the lease arriving).
    The rest of a begun write goes out shielded, within ``FINISH_SEND_TIMEOUT``; past
    that ``trio.BrokenResourceError``. A broken connection raises ``OSError``; a client
    that reads nothing breaks it after ``timeouts.send`` (``TCP_USER_TIMEOUT`` on the
    listening socket), which bounds the wait for a first byte to go.
    """
    if not data:
        return
    sent = send_some(raw, data)
    while not sent:  # nothing written yet: a cancel may still stop the write here
        await trio.lowlevel.wait_writable(raw)
        sent = send_some(raw, data)
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    with trio.CancelScope(shield=True) as scope:
        scope.relative_deadline = FINISH_SEND_TIMEOUT
        while view:
            await trio.lowlevel.wait_writable(raw)
            view = view[send_some(raw, view):]
    if view:
        raise trio.BrokenResourceError("a send did not finish in time")
