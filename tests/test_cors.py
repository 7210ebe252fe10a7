"""CORS: browser pages on another origin calling swapd (docs/http.md#cors).

swapd in-process with fake llama-server children, as in test_api.py; exact requests over
a plain socket where the test must see every header line of an answer (a duplicated
``Access-Control-Allow-Origin`` is what a browser refuses). The browser test drives
Debian's chromium as test_ui.py does, with a page served from a second loopback port.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from swapd.config import parse_config
from swapd.errors import ConfigError
from swapd.serve import Running, open_server
from tests.support.rawhttp import ANSWER_TIMEOUT, request_bytes
from tests.test_api import chat, config_text

T = TypeVar("T")

API_KEY, ADMIN_KEY = "cors-api-key", "cors-admin-key"
PAGE = "http://page.example"
KEYS = {"api_key_env": "SWAPD_CORS_API_KEY", "admin_key_env": "SWAPD_CORS_ADMIN_KEY"}


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("SWAPD_CORS_API_KEY", API_KEY)
    monkeypatch.setenv("SWAPD_CORS_ADMIN_KEY", ADMIN_KEY)
    return KEYS


def port_of(running: Running) -> int:
    return int(running.url.rsplit(":", 1)[1])


async def head_lines(port: int, request: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """The status, every header line (in order, duplicates kept) and whatever of the
    body came with the head."""
    with trio.fail_after(ANSWER_TIMEOUT):
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                assert chunk, f"closed before an answer: {data!r}"
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    pairs = [(name.strip().lower(), value.strip())
             for name, _, value in (line.partition(":") for line in lines)]
    return int(status.split(" ")[1]), pairs, body


def values(pairs: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in pairs if key == name]


def preflight(path: str, origin: str = PAGE, method: str = "POST",
              headers: str = "authorization, content-type, x-stainless-os") -> bytes:
    return request_bytes("OPTIONS", path, [
        ("origin", origin), ("access-control-request-method", method),
        ("access-control-request-headers", headers)])


ROUTES = ["/v1/chat/completions", "/completion", "/v1/models", "/api/tags", "/props",
          "/swapd/status", "/swapd/load", "/metrics", "/no/such/route"]


async def test_preflights_are_answered_without_a_key_on_every_route(
        tmp_path: Path, keys: dict[str, str]) -> None:
    config = parse_config(config_text(tmp_path, security=keys), base_dir=tmp_path)
    async with open_server(config) as running:
        for path in ROUTES:
            status, pairs, _ = await head_lines(port_of(running), preflight(path))
            assert status == 204, path
            assert values(pairs, "access-control-allow-origin") == ["*"], path
            allowed = values(pairs, "access-control-allow-headers")[0].split(", ")
            assert {"authorization", "content-type", "x-api-key", "x-stainless-os"
                    } <= set(allowed), path
            assert "POST" in values(pairs, "access-control-allow-methods")[0]
            assert int(values(pairs, "access-control-max-age")[0]) > 0
        # Chromium's Private Network Access: a public page asking to reach this machine.
        status, pairs, _ = await head_lines(port_of(running), request_bytes(
            "OPTIONS", "/v1/chat/completions", [
                ("origin", PAGE), ("access-control-request-method", "POST"),
                ("access-control-request-private-network", "true")]))
        assert status == 204
        assert values(pairs, "access-control-allow-private-network") == ["true"]
        # An OPTIONS that is not a preflight is routed as before: it needs its key.
        status, _, _ = await head_lines(port_of(running), request_bytes("OPTIONS", "/v1/models"))
        assert status == 401
        assert running.supervisor.proc is None


async def test_every_answer_to_an_allowed_origin_carries_one_allow_origin(
        tmp_path: Path, keys: dict[str, str]) -> None:
    config = parse_config(config_text(tmp_path, security=keys), base_dir=tmp_path)
    key = ("authorization", f"Bearer {API_KEY}")
    body = json.dumps(chat("a")).encode()
    async with open_server(config) as running:
        cases = [
            request_bytes("GET", "/v1/models", [("origin", PAGE), key]),  # Quart
            request_bytes("GET", "/v1/models", [("origin", PAGE)]),  # 401
            request_bytes("POST", "/v1/chat/completions", [("origin", PAGE)], body),  # 401
            request_bytes("POST", "/v1/chat/completions", [("origin", PAGE), key], body),
            request_bytes("POST", "/v1/chat/completions", [("origin", PAGE), key], b"{"),
            request_bytes("GET", "/swapd/status",
                          [("origin", PAGE), ("x-api-key", ADMIN_KEY)]),
        ]
        for request in cases:
            status, pairs, _ = await head_lines(port_of(running), request)
            assert values(pairs, "access-control-allow-origin") == ["*"], (status, pairs)
            assert "retry-after" in values(pairs, "access-control-expose-headers")[0]
        # The child's answer came through: its own (empty) CORS header is not relayed.
        status, pairs, _ = await head_lines(port_of(running), cases[3])
        assert status == 200 and values(pairs, "server") == []
        # Without an Origin, no CORS headers at all.
        status, pairs, _ = await head_lines(port_of(running), request_bytes(
            "POST", "/v1/chat/completions", [key], body))
        assert status == 200
        assert not [name for name, _ in pairs if name.startswith("access-control-")]


async def test_a_stream_that_waits_for_a_swap_keeps_the_header(
        tmp_path: Path, keys: dict[str, str]) -> None:
    config = parse_config(config_text(tmp_path, security=keys), base_dir=tmp_path)
    key = ("x-api-key", API_KEY)
    async with open_server(config) as running:
        for model in ("a", "b", "b"):  # a load, a swap, then the ready model
            status, pairs, _ = await head_lines(port_of(running), request_bytes(
                "POST", "/v1/chat/completions", [("origin", PAGE), key],
                json.dumps(chat(model, stream=True)).encode()))
            assert status == 200
            assert values(pairs, "content-type")[0].startswith("text/event-stream")
            assert values(pairs, "access-control-allow-origin") == ["*"], model


async def test_listed_origins_are_echoed_and_others_refused(tmp_path: Path) -> None:
    config = parse_config(config_text(tmp_path, cors={"allow_origins": [PAGE.upper()]}),
                          base_dir=tmp_path)
    async with open_server(config) as running:
        status, pairs, _ = await head_lines(port_of(running), preflight("/v1/chat/completions"))
        assert status == 204
        assert values(pairs, "access-control-allow-origin") == [PAGE]
        assert "origin" in values(pairs, "vary")[0]
        status, pairs, _ = await head_lines(port_of(running), request_bytes(
            "GET", "/v1/models", [("origin", PAGE)]))
        assert values(pairs, "access-control-allow-origin") == [PAGE]
        assert values(pairs, "vary") == ["origin"]
        other = "http://other.example"
        status, pairs, body = await head_lines(port_of(running), preflight("/v1/models", other))
        assert status == 403 and b"cors.allow_origins" in body
        assert values(pairs, "access-control-allow-origin") == []
        status, pairs, _ = await head_lines(port_of(running), request_bytes(
            "GET", "/v1/models", [("origin", other)]))
        assert status == 200 and values(pairs, "access-control-allow-origin") == []


async def test_without_keys_only_pages_on_this_machine_are_allowed(tmp_path: Path) -> None:
    config = parse_config(config_text(tmp_path), base_dir=tmp_path)
    async with open_server(config) as running:
        for origin in ("http://localhost:5173", "http://127.0.0.1:8080", "http://[::1]:3000",
                       "https://localhost"):
            status, pairs, _ = await head_lines(port_of(running), preflight("/v1/models", origin))
            assert status == 204, origin
            assert values(pairs, "access-control-allow-origin") == [origin]
        for origin in ("https://evil.example", "http://localhost.evil.example", "null"):
            status, pairs, _ = await head_lines(port_of(running), preflight("/v1/models", origin))
            assert status == 403, origin
            status, pairs, _ = await head_lines(port_of(running), request_bytes(
                "GET", "/v1/models", [("origin", origin)]))
            assert values(pairs, "access-control-allow-origin") == [], origin


@pytest.mark.parametrize(("value", "message"), [
    (["http://page.example/"], r"'http://page.example/' is not an origin @ "
                               r"cors.allow_origins\[0\] — write scheme://host"),
    ("page.example", r"is not an origin @ cors.allow_origins\[0\]"),
    ({"a": 1}, r"expected a list of origins, got a mapping @ cors.allow_origins"),
])
def test_a_bad_origin_is_a_config_error_naming_the_fix(
        tmp_path: Path, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(config_text(tmp_path, cors={"allow_origins": value}), base_dir=tmp_path)


# --- a real browser, a page on another origin -----------------------------------------

PAGE_SCRIPT = """
const done = arguments[arguments.length - 1];
(async () => {
  const headers = {"Authorization": "Bearer %(key)s", "Content-Type": "application/json"};
  const models = await fetch("%(url)s/v1/models", {headers});
  const listed = (await models.json()).data.map(m => m.id);
  const answer = await fetch("%(url)s/v1/chat/completions", {method: "POST", headers,
      body: JSON.stringify({model: "b", stream: true,
                            messages: [{role: "user", content: "hi"}]})});
  const reader = answer.body.getReader();
  let text = "";
  for (;;) {
    const {value, done: end} = await reader.read();
    if (end) break;
    text += new TextDecoder().decode(value);
  }
  const refused = await fetch("%(url)s/v1/models");
  done({listed, status: answer.status, text, refused: refused.status,
        error: (await refused.json()).error.code});
})().catch(error => done({failed: String(error)}));
"""


@contextmanager
def page_server() -> Iterator[str]:
    """A page on another origin (a second loopback port): the browser's starting point."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>another origin</title>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(ANSWER_TIMEOUT)


async def test_a_page_on_another_origin_streams_a_chat_in_chromium(
        tmp_path: Path, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_ui import open_browser, require_browser
    require_browser()
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must never fetch a driver
    config = parse_config(config_text(tmp_path, security=keys), base_dir=tmp_path)

    async def in_thread(step: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(partial(step, *args))

    with page_server() as page:
        async with (open_server(config) as running,
                    open_browser(tmp_path / "chromium") as driver):
            # swapd on 127.0.0.1, the page on localhost: two origins, two ports.
            url = running.url.replace("127.0.0.1", "localhost")
            await in_thread(driver.get, page.replace("127.0.0.1", "localhost") + "/")
            await in_thread(driver.set_script_timeout, 30)
            result = await in_thread(driver.execute_async_script,
                                     PAGE_SCRIPT % {"key": API_KEY, "url": url})
    assert "failed" not in result, result
    assert "a" in result["listed"]
    assert result["status"] == 200
    assert "swapd loading b" in result["text"] and "data: [DONE]" in result["text"]
    assert (result["refused"], result["error"]) == (401, "invalid_api_key")
