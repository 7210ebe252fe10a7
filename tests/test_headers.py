"""What crosses the proxy: credentials never, hop-by-hop headers in neither direction.

The child is faked at the HTTP boundary (``httpx.MockTransport``) so the test can see
exactly what swapd sends it; the app runs in-process behind ``httpx.ASGITransport``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio

from swapd.app import create_app, frontend_for
from swapd.config import Config, Profile
from swapd.supervisor import Supervisor
from tests.test_supervisor import FakeLauncher, FakeProc, make_config


async def test_credentials_and_hop_by_hop_headers_do_not_cross(tmp_path: Path,
                                                               autojump_clock: Any) -> None:
    seen: list[httpx.Request] = []

    def child(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=httpx.ByteStream(b'{"ok": true}'), headers={
            "content-type": "application/json", "keep-alive": "timeout=5, max=100",
            "connection": "keep-alive", "x-child": "yes"})

    class MockLauncher(FakeLauncher):
        def __call__(self, config: Config, profile: Profile, log: Any,
                     extra_argv: Any = ()) -> FakeProc:
            proc = super().__call__(config, profile, log)
            proc.client = httpx.AsyncClient(  # type: ignore[attr-defined]
                transport=httpx.MockTransport(child), base_url="http://child")
            return proc

    config = make_config(tmp_path)
    supervisor = Supervisor(config, launcher=MockLauncher())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        app = create_app(frontend_for(config, supervisor))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://swapd") as client:
            response = await client.post(
                "/v1/chat/completions?debug=1", json={"model": "a", "messages": []},
                headers={"authorization": "Bearer client-secret", "x-api-key": "other",
                         "connection": "keep-alive, x-private", "te": "trailers",
                         "proxy-authorization": "Basic xyz", "x-request-id": "r1",
                         "x-private": "hop-by-hop, since Connection names it"})
        await supervisor.shutdown()
    assert response.status_code == 200
    (forwarded,) = seen
    assert forwarded.url.path == "/v1/chat/completions"
    assert forwarded.url.query == b"debug=1"
    for header in ("authorization", "x-api-key", "te", "proxy-authorization", "x-private"):
        assert header not in forwarded.headers, header
    assert forwarded.headers.get("connection") != "keep-alive, x-private"
    assert forwarded.headers["x-request-id"] == "r1"  # ordinary headers pass
    assert "keep-alive" not in response.headers
    assert response.headers["x-child"] == "yes"
