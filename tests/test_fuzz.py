"""Junk at the front door: no request makes swapd's own code fail.

Hypothesis writes requests (methods, paths of every route mangled and percent-encoded,
query strings, headers, JSON and non-JSON bodies, JSON nested thousands deep) and sends
each byte for byte (``tests/support/rawhttp.py``) to a real swapd on loopback whose one
profile is the fake llama-server, so inference requests really load and proxy.

An answer may be anything but a 500 (a 502/503/504 says an upstream failed, which is
allowed), and nothing may be logged with a traceback: hypercorn logs one for an
exception that escapes the app, Quart for one that escapes a route.

Bounded for CI: a fixed number of examples, derandomized (the same requests every run),
no example database, no per-example deadline (a model load takes what it takes).
"""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from swapd.config import parse_config
from swapd.http.app import create_app
from swapd.serve import open_server
from tests.support.rawhttp import exchange, request_bytes
from tests.test_api import config_text

EXAMPLES = 60
"""Per kind of request: bodies aimed at JSON routes, anything at any route, and
chat requests that mostly reach the model."""

UPSTREAM_FAILURES = frozenset({502, 503, 504})

SEGMENTS = ["v1", "swapd", "api", "ui", "chat", "completions", "models", "status", "load",
            "unload", "reload", "logs", "stream", "events", "metrics", "show", "props",
            "health", "a", "alpha", "nope", "", ".", "..", "%2F", "%2e%2e", "%00", "%20",
            "%0d%0a", "%ff", "%3F", "%23", "%25", "\u00e9", "\u2028", "\\", ";x", "*"]

JSON_LEAF = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
             | st.text(max_size=20))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                          max_leaves=12)
MODELS = st.sampled_from(["a", "alpha", "a:latest", "nope", "", "[swapd] a"]) | JSON_VALUE
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]) | JSON_VALUE},
    optional={"content": st.text(max_size=30) | JSON_VALUE,
              "reasoning_content": st.just("[swapd] loading a\nkept") | JSON_VALUE})
REQUEST_BODY = st.fixed_dictionaries({}, optional={
    "model": MODELS, "messages": st.lists(MESSAGE, max_size=3) | JSON_VALUE,
    "prompt": st.text(max_size=20) | JSON_VALUE, "stream": st.booleans() | JSON_VALUE,
    "max_tokens": st.integers(-2, 4) | JSON_VALUE, "name": MODELS,
})


CHAT_BODY = st.fixed_dictionaries(
    {"model": st.sampled_from(["a", "alpha"]),
     "messages": st.lists(MESSAGE, min_size=1, max_size=3)},
    optional={"stream": st.booleans(), "max_tokens": st.integers(-1, 3),
              "stream_options": JSON_VALUE, "temperature": JSON_VALUE},
).map(lambda body: json.dumps(body).encode())
"""Bodies that mostly get through to the model, so relaying answers is fuzzed too."""


@st.composite
def deep_json(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(100, 5000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    inner = opener * depth + b"1" + closer * depth * draw(st.sampled_from([0, 1]))
    return b'{"model": "a", "x": ' + inner + b"}" if draw(st.booleans()) else inner


BODIES = st.one_of(
    st.just(b""),
    REQUEST_BODY.map(lambda body: json.dumps(body).encode()),
    JSON_VALUE.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=64),
    deep_json(),
)


@st.composite
def targets(draw: st.DrawFn, known: list[str]) -> str:
    if draw(st.booleans()):
        path = draw(st.sampled_from(known))
        if draw(st.booleans()):
            path += draw(st.sampled_from(["", "/", "//", "/.", "/..", "%00", "%20x", "%2F",
                                          "/a", "#x", ";x"]))
    else:
        segments = draw(st.lists(st.sampled_from(SEGMENTS) | st.text(max_size=6),
                                 min_size=1, max_size=5))
        path = "/" + "/".join(segments)
    if draw(st.integers(0, 9)) == 0:
        path = draw(st.sampled_from(["http://swapd", "//", "*", ""])) + path
    target = quote(path, safe="/%:@!$&'()*+,;=-._~#")  # what h11 lets into a request line
    if draw(st.booleans()):
        params = draw(st.lists(st.tuples(
            st.sampled_from(["model", "name", "lines", "since", "x"]) | st.text(max_size=5),
            st.sampled_from(["a", "-5", "0", "3", "abc", "9" * 30, ""]) | st.text(max_size=8)),
            max_size=3))
        target += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='%')}"
                                 for k, v in params)
    return target or "/"


HEADER_NAMES = ["content-type", "authorization", "x-api-key", "accept", "accept-encoding",
                "te", "upgrade", "connection", "keep-alive", "proxy-authorization",
                "x-forwarded-for", "user-agent", "cookie", "sec-websocket-key",
                "sec-websocket-version", "x-junk"]
HEADER_VALUE = st.sampled_from([
    "upgrade", "websocket", "13", "dGhlIHNhbXBsZSBub25jZQ==", "keep-alive, x-api-key",
    "application/json", "Bearer", "Bearer x", "gzip", "trailers",
]) | st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ",
             max_size=40).map(str.strip)
METHODS = st.sampled_from(["GET", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                           "HEAD"]) | st.text(alphabet=string.ascii_uppercase, min_size=1,
                                              max_size=8)


def known_paths(app: Any) -> list[str]:
    paths = set()
    for rule in app.url_map.iter_rules():
        paths.add(rule.rule.replace("<path:anything>", "chat/completions")
                  .replace("<path:model_id>", "a").replace("<name>", "app.js"))
    return sorted(paths)


INFERENCE_ROUTES = ["/v1/chat/completions", "/v1/completions", "/chat/completions",
                    "/completion", "/v1/embeddings", "/v1/responses"]

JSON_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/x",
               "/completion", "/infill", "/swapd/load", "/api/show"]
"""Routes that read a JSON body, for the examples that aim at the body parsers."""


async def test_no_request_is_a_500(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = json.loads(config_text(tmp_path, a_flags={"fake-load-ms": 0}))
    del config["profiles"]["b"]  # one model: requests proxy, they do not swap all the time
    caplog.set_level(logging.WARNING)
    async with open_server(parse_config(json.dumps(config), base_dir=tmp_path)) as running:
        port = int(running.url.rsplit(":", 1)[1])
        known = known_paths(create_app(running.frontend))
        sent: list[int] = []

        def check(method: str, target: str, headers: list[tuple[str, str]],
                  body: bytes) -> None:
            logged = len(caplog.records)
            answer = trio.from_thread.run(exchange, port,
                                          request_bytes(method, target, headers, body))
            sent.append(answer.status)
            assert answer.status != 500 and (
                answer.status < 500 or answer.status in UPSTREAM_FAILURES), (
                f"{method} {target}: {answer.status} {answer.body[:300]!r}")
            tracebacks = [r for r in caplog.records[logged:] if r.exc_info]
            assert not tracebacks, f"{method} {target}: {tracebacks[0].getMessage()}"

        bounded = settings(max_examples=EXAMPLES, derandomize=True, database=None,
                           deadline=None, phases=(Phase.generate, Phase.shrink),
                           suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.data_too_large])
        headers = st.lists(st.tuples(st.sampled_from(HEADER_NAMES), HEADER_VALUE),
                           max_size=4)

        @bounded
        @given(target=st.sampled_from(JSON_ROUTES) | targets(JSON_ROUTES), headers=headers,
               body=BODIES)
        def json_bodies(target: str, headers: list[tuple[str, str]], body: bytes) -> None:
            check("POST", target, headers, body)

        @bounded
        @given(method=METHODS, target=targets(known), headers=headers, body=BODIES)
        def any_request(method: str, target: str, headers: list[tuple[str, str]],
                        body: bytes) -> None:
            check(method, target, headers, body)

        @bounded
        @given(target=st.sampled_from(INFERENCE_ROUTES), headers=headers, body=CHAT_BODY)
        def chat_requests(target: str, headers: list[tuple[str, str]], body: bytes) -> None:
            check("POST", target, headers, body)

        await trio.to_thread.run_sync(json_bodies)
        await trio.to_thread.run_sync(any_request)
        await trio.to_thread.run_sync(chat_requests)
        assert len(sent) >= 3 * EXAMPLES
        assert 200 in sent and 400 in sent and 404 in sent  # it reached the routes
