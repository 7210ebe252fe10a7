"""API keys and request limits at the front door."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio

from swapd.config import Config, Profile, Security, parse_config
from swapd.core.supervisor import Supervisor
from swapd.errors import ConfigError
from swapd.http.app import create_app, frontend_for
from swapd.http.auth import load_keys
from swapd.http.fastpath import NATIVE_POSTS
from swapd.http.proxy import KNOWN_ROUTES
from swapd.net.upstream import ChildPool
from swapd.serve import fast_path, open_server
from tests.support.rawhttp import exchange, request_bytes, wire_exchange
from tests.test_api import chat, config_text, swapd
from tests.test_supervisor import FakeLauncher, FakeProc, make_config


async def test_api_and_admin_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPD_TEST_KEYS", "k1, k2")
    admin_file = tmp_path / "admin.keys"
    admin_file.write_text("# operators\nadmin-secret\n")
    config = parse_config(config_text(tmp_path, security={
        "api_key_env": "SWAPD_TEST_KEYS", "admin_key_file": str(admin_file)}))
    async with open_server(config) as running, httpx.AsyncClient(base_url=running.url) as c:
        refused = await c.get("/v1/models")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert (await c.get("/v1/models", headers={"authorization": "Bearer k2"})
                ).status_code == 200
        assert (await c.get("/v1/models", headers={"x-api-key": "k1"})).status_code == 200
        assert (await c.get("/v1/models", headers={"authorization": "Bearer k3"})
                ).status_code == 401
        assert (await c.post("/v1/chat/completions", json=chat("a"))).status_code == 401
        assert (await c.get("/health")).status_code == 200  # liveness needs no secret
        # operations take the admin key, not an API key
        assert (await c.get("/swapd/status", headers={"x-api-key": "k1"})
                ).status_code == 401
        assert (await c.get("/metrics", headers={"x-api-key": "k1"})).status_code == 401
        assert (await c.get("/swapd/status", headers={"authorization": "Bearer admin-secret"})
                ).status_code == 200
        assert running.supervisor.proc is None


def test_named_but_missing_keys_are_config_errors(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEYS", raising=False)
    with pytest.raises(ConfigError, match=r"\$NO_SUCH_KEYS is empty or not set @ "
                                          r"security.api_key_env"):
        load_keys(Security(api_key_env="NO_SUCH_KEYS"))
    with pytest.raises(ConfigError, match=r"cannot read .*nope\.keys.* @ security\.admin_key_file"):
        load_keys(Security(admin_key_file=tmp_path / "nope.keys"))
    assert load_keys(Security()).required("/v1/models") == ()


# --- every spelling of every protected route, under every key setup -------------------

API_KEY, ADMIN_KEY = "api-secret", "admin-secret"
KEY_SETUPS = {
    "api only": {"api_key_env": "SWAPD_TEST_API_KEY"},
    "admin only": {"admin_key_env": "SWAPD_TEST_ADMIN_KEY"},
    "both": {"api_key_env": "SWAPD_TEST_API_KEY", "admin_key_env": "SWAPD_TEST_ADMIN_KEY"},
}
CONVERTER_SAMPLES = {"path": "chat/completions"}
"""A value for each converter of a rule (``<path:x>``); any other converter gets "a"."""

REAL_SAMPLE = frozenset({"/swapd/status", "/swapd/unload", "/v1/chat/completions"})
"""Routes whose walk also goes through the real server, which must answer the same."""

REFUSALS = {401: None, 400: "invalid_path", 404: "not_found", 405: "method_not_allowed"}
"""What a request without the right key may get: 401, or an error that no handler
produced (no route ran: the path is malformed, unknown, or the method is wrong)."""


def needs(path: str) -> str:
    """Which key a route takes, as docs/http.md says: "open", "api" or "admin"."""
    if path in ("/", "/health") or path.startswith("/ui/"):
        return "open"
    if path == "/metrics" or path.startswith(("/swapd/", "/models/")):
        return "admin"
    return "api"


def routes(app: Any) -> list[tuple[str, str]]:
    """(method, path) for every route of the app's URL map, plus the inference routes."""
    found = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:(\w+):)?\w+>",
                      lambda m: CONVERTER_SAMPLES.get(m.group(1) or "", "a"), rule.rule)
        for method in (rule.methods or set()) - {"HEAD"}:  # HEAD takes GET's route
            found.add((method, path))
    found |= {("POST", path) for path in KNOWN_ROUTES}
    return sorted(found)


def spellings(path: str) -> set[str]:
    """Request targets that some layer (decoder, router) might read as ``path``."""
    rest = path[1:]
    segments = rest.split("/")
    out = {
        path, "/" + path, "//" + path, path + "/", path + "/.", "/./" + rest, "/x/.." + path,
        "/x/%2e%2e" + path, "/%2F" + rest, "/" + rest.replace("/", "%2F"),
        "/" + "".join(f"%{byte:02X}" for byte in rest.encode()),
        f"/%{ord(rest[0]):02x}{rest[1:]}", f"/%25{ord(rest[0]):02X}{rest[1:]}",
        path.upper(), path + ";x", path + "%00", path + "%20", path + "%0d%0aX-Injected:%201",
        "/\\" + rest, "http://swapd" + path, "http://swapd/" + path,
    }
    for i in range(1, len(segments)):
        head, tail = "/".join(segments[:i]), "/".join(segments[i:])
        out |= {f"/{head}//{tail}", f"/{head}/./{tail}", f"/{head}/x/../{tail}"}
    return out


async def test_no_spelling_of_a_protected_route_opens_it_without_its_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every route of the URL map (and every inference route) in many spellings, with no
    key and with the wrong one, under each key setup. The walk runs in-process (the
    server's connection handler on a socket pair); a sample goes through the real
    listening socket too and must get the same answers."""
    monkeypatch.setenv("SWAPD_TEST_API_KEY", API_KEY)
    monkeypatch.setenv("SWAPD_TEST_ADMIN_KEY", ADMIN_KEY)
    leaks: list[str] = []
    checked = 0
    for setup, security in KEY_SETUPS.items():
        config_file = tmp_path / f"{setup.replace(' ', '-')}.yaml"
        config_file.write_text(config_text(tmp_path, security=security))
        config = parse_config(config_file.read_text(), base_dir=tmp_path)
        has_api, has_admin = "api_key_env" in security, "admin_key_env" in security
        right = {"open": None, "api": API_KEY if has_api else None,
                 "admin": ADMIN_KEY if has_admin else API_KEY if has_api else None}
        async with open_server(config, config_path=config_file) as running:
            port = int(running.url.rsplit(":", 1)[1])
            app = create_app(running.frontend)
            server = running.fastpath
            for method, path in routes(app):
                key = right[needs(path)]
                if key is None:
                    continue  # open in this setup
                body = b"{}" if method == "POST" else b""
                # The right key opens the plain spelling: the walk below tests something.
                opened = await wire_exchange(server, request_bytes(
                    method, path, [("x-api-key", key)], body))
                assert opened.status != 401 and opened.error_code() != "invalid_path", (
                    setup, method, path, opened)
                # The other key is wrong here (an API key on an admin route, an admin key
                # on an API route, or one that is not configured at all).
                other = ADMIN_KEY if key == API_KEY else API_KEY
                tries = [(path, other)] + [(target, None) for target in spellings(path)]
                if needs(path) == "admin":
                    tries += [(target, other) for target in spellings(path)]
                for target, credential in sorted(tries, key=str):
                    headers = [("authorization", f"Bearer {credential}")] if credential else []
                    request = request_bytes(method, target, headers, body)
                    answer = await wire_exchange(server, request)
                    checked += 1
                    if answer.status not in REFUSALS or REFUSALS[answer.status] not in (
                            None, answer.error_code()):
                        leaks.append(f"{setup}: {method} {target} with "
                                     f"{credential or 'no key'} -> {answer.status} "
                                     f"{answer.body[:80]!r}")
                    if path in REAL_SAMPLE:
                        real = await exchange(port, request)
                        assert (real.status, real.error_code()) == (
                            answer.status, answer.error_code()), (setup, method, target)
    assert checked > 1000
    assert not leaks, f"{len(leaks)} of {checked} requests got past the keys:\n" + "\n".join(
        leaks[:60])


# --- bodies that are JSON, but not what a route can use --------------------------------

JSON_ROUTES = ("/v1/chat/completions", "/v1/anything", "/completion", "/swapd/load",
               "/api/show", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
"""Every route that reads a JSON body: inference (under /v1/ and llama-server's own),
operations, and Ollama's (its errors are ``{"error": "..."}``)."""

DEPTH = 100_000


NOT_AN_OBJECT = {
    "deep array": b"[" * DEPTH + b"]" * DEPTH,
    "deep object": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
    "deep, unclosed": b"[" * DEPTH,
    "deep inside an object": b'{"model": "a", "x": ' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    "empty array": b"[]", "array": b'[{"model": "a"}]', "string": b'"x"', "number": b"3",
    "null": b"null", "true": b"true", "not JSON": b"{not json", "not UTF-8": b"\xff\xfe",
}


async def test_a_body_that_is_not_a_json_object_is_400_on_every_route(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, client):
        for what, body in NOT_AN_OBJECT.items():
            for path in JSON_ROUTES:
                answer = await client.post(path, content=body)
                assert answer.status_code == 400, (what, path, answer.status_code,
                                                   answer.text[:200])
                error = answer.json()["error"]
                if path.startswith("/api/"):
                    assert "JSON" in error, (what, path, error)
                else:
                    assert (error["type"], error["code"]) == (
                        "invalid_request_error", "invalid_json"), (what, path)
        assert running.supervisor.proc is None


async def test_fields_of_the_wrong_type_are_400(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, client):
        for path in JSON_ROUTES:
            for field in ("model", "name"):
                answer = await client.post(path, json={field: ["a"]})
                if path.startswith("/api/"):
                    assert answer.status_code == 400, (path, field, answer.text[:200])
                    assert "must be a string" in answer.json()["error"], path
                elif field == "model":
                    assert answer.status_code == 400, (path, field, answer.text[:200])
                    assert answer.json()["error"]["code"] in ("invalid_model",), path
        assert running.supervisor.proc is None


async def test_odd_message_shapes_reach_the_model_check_not_a_500(tmp_path: Path) -> None:
    """A body that mentions swapd's progress prefix is searched for progress lines to
    strip; ``messages`` of any JSON type must survive that search."""
    async with swapd(tmp_path) as (running, client):
        for messages in (5, True, "[swapd] x", {"role": "assistant"},
                         [5, None, {"role": "assistant", "reasoning_content": 5}]):
            answer = await client.post("/v1/chat/completions", json={
                "messages": messages, "note": "[swapd] loading"})
            assert answer.status_code == 400, (messages, answer.text[:200])
            assert answer.json()["error"]["code"] == "model_required"
        assert running.supervisor.proc is None


# --- what reaches the child's request line --------------------------------------------

async def test_the_forwarded_request_line_is_re_encoded(tmp_path: Path) -> None:
    """Whatever path and query a front end decodes, llama-server gets one well-formed
    request line: nothing can end it early, start a header, or move a '?' or '#'."""
    seen: list[h11.Request] = []

    async def child(stream: trio.SocketStream) -> None:
        """Answers every request on the connection; records what it was sent."""
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                seen.append(event)
            elif isinstance(event, h11.EndOfMessage):
                body = b'{"ok": true}'
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                    ("content-type", "application/json"),
                    ("content-length", str(len(body)))])) or b"")
                await stream.send_all((conn.send(h11.Data(data=body)) or b"")
                                      + (conn.send(h11.EndOfMessage()) or b""))
                conn.start_next_cycle()
            elif not isinstance(event, h11.Data):
                return

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
        supervisor = Supervisor(config, launcher=LoopbackLauncher(load_time=0))  # type: ignore[arg-type]
        await nursery.start(supervisor.run)
        server = fast_path(frontend_for(config, supervisor))
        # request target as a client may send it -> request target llama-server gets
        cases = {
            b"/v1/a%3Fb": b"/v1/a%3Fb",
            b"/v1/a%23b": b"/v1/a%23b",
            b"/v1/100%25": b"/v1/100%25",
            b"/v1/caf%C3%A9": b"/v1/caf%C3%A9",
            b"/v1/caf%c3%a9": b"/v1/caf%C3%A9",
            b"/v1/%78": b"/v1/x",
            b"/v1/x?a=1&b=%20c": b"/v1/x?a=1&b=%20c",
            b"/v1/x?a=%FF%0D%0AX-Injected:%201": b"/v1/x?a=%FF%0D%0AX-Injected:%201",
        }
        for raw, target in cases.items():
            answer = await wire_exchange(server, request_bytes("POST", raw,
                                                               body=b'{"model": "a"}'))
            assert answer.status == 200, (raw, answer)
            assert seen[-1].target == target, (raw, seen[-1].target)
            assert b"x-injected" not in dict(seen[-1].headers)
        # a control character or space in the path never gets that far
        for raw in (b"/v1/x%20y", b"/v1/a%00b", b"/v1/a%0D%0AX-Injected:%201"):
            answer = await wire_exchange(server, request_bytes("POST", raw,
                                                               body=b'{"model": "a"}'))
            assert (answer.status, answer.error_code()) == (400, "invalid_path"), raw
        assert len(seen) == len(cases)
        await supervisor.shutdown()
        nursery.cancel_scope.cancel()


# --- what a client learns about other processes ---------------------------------------

async def test_a_port_holder_is_named_to_clients_by_pid_and_program_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another process's command line can hold secrets (tokens, paths): clients get its
    pid and program name; the whole command line goes to swapd's own log."""
    secret = "--token=hunter2-do-not-show"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys, time\n"
         "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
         "print(s.getsockname()[1], flush=True); time.sleep(60)", secret],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        port = int(await trio.to_thread.run_sync(holder.stdout.readline))
        config = json.loads(config_text(tmp_path))
        config["llama_server"]["port"] = port
        caplog.set_level(logging.WARNING, "swapd.core.process")
        async with open_server(parse_config(json.dumps(config))) as running, \
                httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            answer = await client.post("/v1/chat/completions", json=chat("a"))
            assert answer.status_code == 503
            message = answer.json()["error"]["message"]
            status = (await client.get("/swapd/status")).text
        program = Path(sys.executable).name
        assert f"in use by pid {holder.pid} ({program})" in message
        for shown in (message, status):
            assert secret not in shown and "socket.socket" not in shown
        logged = "\n".join(record.getMessage() for record in caplog.records)
        assert f"pid {holder.pid}" in logged and secret in logged
    finally:
        holder.kill()
        holder.wait()


# --- unknown paths and wrong methods ----------------------------------------------------

async def test_unknown_paths_are_json_404_and_wrong_methods_405_with_allow(
        tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, client):
        app = create_app(running.frontend)
        for path in ("/nope", "/v1beta/models", "/swapd/nope", "/api/nope", "/ui/nope.js"):
            answer = await wire_exchange(running.fastpath, request_bytes("GET", path))
            assert (answer.status, answer.error_code()) == (404, "not_found"), path
            assert answer.headers["content-type"] == "application/json", path
        # every route of the URL map, with a method it does not take
        taken = set(routes(app))
        for method, path in sorted(taken):
            for wrong in ("PUT", "DELETE", "PATCH", "GET", "POST"):
                if (wrong, path) in taken or (wrong == "POST" and (
                        path.startswith("/v1/") or path in NATIVE_POSTS)):
                    continue  # a route, or the inference proxy's
                answer = await wire_exchange(running.fastpath, request_bytes(
                    wrong, path, body=b"{}" if wrong in ("POST", "PUT", "PATCH") else b""))
                assert (answer.status, answer.error_code()) == (
                    405, "method_not_allowed"), (wrong, path, answer)
                allowed = {m.strip() for m in answer.headers["allow"].split(",")}
                assert method in allowed, (wrong, path, allowed)
        # inference paths take POST only, under /v1/ and llama-server's own
        for path in ("/v1/chat/completions", "/v1/anything/else", "/completion", "/infill"):
            for wrong in ("GET", "PUT", "DELETE"):
                answer = await client.request(wrong, path)
                assert answer.status_code == 405, (wrong, path)
                assert answer.json()["error"]["code"] == "method_not_allowed"
                assert "POST" in answer.headers["allow"].split(", "), (wrong, path)
        # a discovery path under /v1/ takes GET, and POST (any POST under /v1/ is inference)
        answer = await client.delete("/v1/models")
        assert answer.status_code == 405
        assert {"GET", "POST"} <= set(answer.headers["allow"].split(", "))
        answer = await client.put("/swapd/status")
        assert (answer.status_code, answer.headers["allow"]) == (405, "GET, HEAD, OPTIONS")
        assert running.supervisor.proc is None


# --- query parameters ------------------------------------------------------------------

async def test_junk_query_parameters_are_400_not_ignored_or_misread(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, client):
        assert running.frontend.child_log is not None
        running.frontend.child_log.write([f"line {i}" for i in range(10)])
        tail = await client.get("/swapd/logs", params={"lines": "3"})
        assert (tail.status_code, tail.text) == (200, "line 7\nline 8\nline 9\n")
        huge = await client.get("/swapd/logs", params={"lines": "9" * 5000})
        assert huge.status_code == 200 and huge.text.endswith("line 9\n")
        for junk in ("-5", "0", "abc", "1e3", "", " 3", "٣", "-" + "9" * 5000):
            answer = await client.get("/swapd/logs", params={"lines": junk})
            assert (answer.status_code, answer.json()["error"]["code"]) == (
                400, "invalid_parameter"), junk
        for junk in ("junk", "", "1.5", "-2", "٣"):
            answer = await client.get("/swapd/events", params={"since": junk})
            assert (answer.status_code, answer.json()["error"]["code"]) == (
                400, "invalid_parameter"), junk
        for since in ("-1", "0", "9" * 5000):
            async with client.stream("GET", "/swapd/events", params={"since": since}) as ok:
                assert ok.status_code == 200, since
        for name in ("\x00", "a" * 10_000, "../../etc/passwd", "%ff"):
            for path in ("/api/show", "/props", "/v1/props"):
                answer = await client.get(path, params={"model": name})
                assert answer.status_code == 404, (path, name[:20])
        assert running.supervisor.proc is None


async def test_websocket_upgrades_are_refused_on_every_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """swapd serves no WebSocket: an upgrade is refused before routing and before the
    key check, whoever asks (it was a 500 from the JSON error handler, open to all)."""
    monkeypatch.setenv("SWAPD_TEST_API_KEY", API_KEY)
    async with swapd(tmp_path, security={"api_key_env": "SWAPD_TEST_API_KEY"}) as (
            running, _client):
        port = int(running.url.rsplit(":", 1)[1])
        for path in ("/v1/models", "/swapd/status", "/swapd/events", "//swapd/status",
                     "/health", "/nope", "/v1/chat/completions"):
            for key in (None, API_KEY):
                headers = [("upgrade", "websocket"), ("sec-websocket-version", "13"),
                           ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]
                if key:
                    headers.append(("x-api-key", key))
                request = request_bytes("GET", path, headers).replace(
                    b"connection: close", b"connection: upgrade")
                answer = await exchange(port, request)
                assert answer.status == 403, (path, key, answer)
