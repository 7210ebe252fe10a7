"""What crosses the proxy: credentials never, hop-by-hop headers in neither direction.

The child is a tiny HTTP/1.1 server on loopback that records what swapd sends it; swapd's
connection handler runs in-process on a socket pair.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import h11
import trio

from swapd.config import Config, Profile
from swapd.core.supervisor import Supervisor
from swapd.http.app import frontend_for
from swapd.net.upstream import ChildPool
from swapd.serve import fast_path
from tests.support.rawhttp import request_bytes, wire_exchange
from tests.test_supervisor import FakeLauncher, FakeProc, make_config


async def test_credentials_and_hop_by_hop_headers_do_not_cross(tmp_path: Path) -> None:
    seen: list[h11.Request] = []

    async def child(stream: trio.SocketStream) -> None:
        """A one-request HTTP/1.1 server that records what it was sent."""
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                seen.append(event)
            elif isinstance(event, h11.EndOfMessage):
                break
        body = b'{"ok": true}'
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
            ("content-type", "application/json"), ("content-length", str(len(body))),
            ("keep-alive", "timeout=5, max=100"), ("x-child", "yes")])) or b"")
        await stream.send_all((conn.send(h11.Data(data=body)) or b"")
                              + (conn.send(h11.EndOfMessage()) or b""))

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, child, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]

        class LoopbackLauncher(FakeLauncher):
            def __call__(self, config: Config, profile: Profile, log: Any,
                         extra_argv: Any = ()) -> FakeProc:
                proc = super().__call__(config, profile, log)
                proc.pool = ChildPool("127.0.0.1", port)  # type: ignore[attr-defined]
                return proc

        config = make_config(tmp_path)
        supervisor = Supervisor(config, launcher=LoopbackLauncher())  # type: ignore[arg-type]
        await nursery.start(supervisor.run)
        server = fast_path(frontend_for(config, supervisor))
        request = request_bytes(
            "POST", "/v1/chat/completions?debug=1", [
                ("authorization", "Bearer client-secret"), ("x-api-key", "other"),
                ("connection", "keep-alive, x-private"), ("te", "trailers"),
                ("proxy-authorization", "Basic xyz"), ("x-request-id", "r1"),
                ("x-private", "hop-by-hop, since Connection names it")],
            json.dumps({"model": "a", "messages": []}).encode())
        response = await wire_exchange(server, request.replace(b"connection: close\r\n", b""))
        await supervisor.shutdown()
        nursery.cancel_scope.cancel()
    assert response.status == 200
    (forwarded,) = seen
    assert forwarded.target == b"/v1/chat/completions?debug=1"
    headers = dict(forwarded.headers)
    for header in (b"authorization", b"x-api-key", b"te", b"proxy-authorization",
                   b"x-private", b"connection"):
        assert header not in headers, header
    assert headers[b"x-request-id"] == b"r1"  # ordinary headers pass
    assert "keep-alive" not in response.headers
    assert response.headers["x-child"] == "yes"
