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
from urllib.parse import unquote

import attrs
import trio

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
            while chunk := await stream.receive_some(65536):
                body += chunk
    return attrs.evolve(answer, body=body)


async def asgi_exchange(app: Any, request: bytes) -> RawAnswer:
    """Hand ``request`` to the ASGI ``app`` in-process, in the scope hypercorn builds.

    The same bytes as ``exchange`` sends, without a socket or hypercorn's per-request
    machinery (milliseconds each on a busy machine): for walks of thousands of requests.
    Tests that use it also compare a sample with ``exchange`` against the real server,
    so a hypercorn that builds its scope differently fails them.
    """
    head, _, body = request.partition(b"\r\n\r\n")
    request_line, *lines = head.split(b"\r\n")
    method, raw_target, _version = request_line.split(b" ")
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    path, _, query = raw_target.partition(b"?")  # as hypercorn/protocol/http_stream.py
    return await asgi_call(app, method.decode("ascii"), unquote(path.decode("ascii")), query,
                           body, headers, raw_path=path)


async def asgi_call(app: Any, method: str, path: str, query: bytes = b"", body: bytes = b"",
                    headers: Iterable[tuple[bytes, bytes]] = (),
                    raw_path: bytes | None = None) -> RawAnswer:
    """One request to the ASGI ``app`` with exactly this (decoded) path and raw query."""
    scope = {"type": "http", "http_version": "1.1", "asgi": {"spec_version": "2.1",
             "version": "3.0"}, "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode("utf-8") if raw_path is None else raw_path,
             "query_string": query, "root_path": "", "headers": list(headers),
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {},
             "extensions": {}}
    started: dict[str, Any] = {}
    chunks: list[bytes] = []
    answered = trio.Event()
    sent_request = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()  # then the client leaves, as exchange() does
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.update(message)
            if any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                   for name, value in message["headers"]):
                answered.set()  # the head is all a stream's check reads
        elif message["type"] == "http.response.body" and not answered.is_set():
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    with trio.fail_after(ANSWER_TIMEOUT):
        await app(scope, receive, send)
    if not started:
        raise AssertionError(f"no answer to {method} {path}")
    return RawAnswer(started["status"], {name.decode("latin-1").lower(): value.decode(
        "latin-1") for name, value in started["headers"]}, b"".join(chunks))
