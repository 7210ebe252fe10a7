"""The front door at the byte level: malformed and adversarial HTTP/1.1 on the real socket.

Every test here talks to a real swapd (``open_server``, the fake llama-server behind it)
over plain TCP (``RawConnection``), so it holds whatever parses the requests: hypercorn
today, swapd's own connection handler for the inference fast path (issue 15) tomorrow.
A server facing the network must be at least as strict as this:

* heads: at most ``MAX_HEAD_BYTES`` and ``MAX_HEADERS``, complete within
  ``timeouts.headers`` (slowloris), or 431/400 and the connection closed;
* bodies: a declared or chunked size past ``security.max_body`` is 413 before it is
  read, a stalled one 408 at ``timeouts.body``;
* framing: ``Content-Length`` with ``Transfer-Encoding``, duplicate or malformed lengths,
  unknown or obfuscated codings, bad request lines, NUL, bare CR, obs-fold: 400 and the
  connection closed, and never a second request read out of the first one's body;
* pipelined requests are answered in order (or the connection closed after one);
  HTTP/1.0 is answered and closed; ``Expect: 100-continue`` gets its 100 before the
  body is sent, or the final refusal instead;
* no request, however broken, and no client that leaves at any moment, gets a 5xx or
  takes the server down.

A single ``Line Feed`` ends a line as well as CRLF (RFC 9112 §2.2 lets a recipient accept
it; h11 does): such requests may be answered normally. A bare CR is refused.

Hypercorn (h11) failed 46 of these (smuggling, folded lines, HTTP/2.0 request lines,
no header count limit, a 100 Continue racing a 413, a pipelined request after a close
that could crash the server); the fast path passes all. Real-time waits are deadlines on
short configured timeouts, never measurements.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from swapd.config import parse_config
from swapd.serve import MAX_HEAD_BYTES, Running, open_server
from tests.support.rawhttp import RawAnswer, RawConnection, ServerClosed
from tests.test_api import config_text

SHORT = 0.5
"""``timeouts.headers`` and ``timeouts.body`` in the timing tests, in seconds."""

IDLE = 1.0
"""``timeouts.headers`` where a first request must still get through before it."""

DEADLINE = 15.0
"""Real-time deadline for what ``SHORT`` timeouts must bring about (a close, a 408):
generous for a loaded 2-core machine; it turns "waits forever" into a failure."""

LOAD_DEADLINE = 60.0
"""Deadline for an answer that needs the fake llama-server started first."""

MAX_BODY = 64 * 1024
MAX_HEADERS = 100
"""The most header lines a request may carry (hypercorn/h11 have no such limit)."""

INFERENCE = "/v1/chat/completions"
QUART = "/api/show"
"""A POST route served by Quart that reads a JSON body (and loads nothing)."""
OLLAMA = "/api/chat"  # translated in the fast path, errors in Ollama's shape
ROUTER = "/models/load"  # llama.cpp's router API, served by the Quart app
ROUTES = [INFERENCE, QUART, OLLAMA, ROUTER]

CHAT = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 2}).encode()
SHOW = json.dumps({"model": "a"}).encode()

REFUSED = frozenset({400, 431})
"""What a malformed head may get (besides a close without an answer)."""


@asynccontextmanager
async def wire_server(tmp_path: Path, *, headers: float = 10.0, body: float = 10.0,
                      ) -> AsyncIterator[tuple[Running, int]]:
    """A swapd on the fake llama-server (``a`` loads at once) and its port."""
    config = json.loads(config_text(
        tmp_path, a_flags={"fake-load-ms": 0},
        timeouts={"headers": f"{headers}s", "body": f"{body}s"},
        security={"max_body": MAX_BODY}))
    async with open_server(parse_config(json.dumps(config), base_dir=tmp_path)) as running:
        yield running, int(running.url.rsplit(":", 1)[1])


def post(path: str, body: bytes, *extra: bytes, version: bytes = b"HTTP/1.1",
         length: int | None = None) -> bytes:
    head = [b"POST " + path.encode() + b" " + version, b"host: swapd",
            b"content-type: application/json",
            b"content-length: %d" % (len(body) if length is None else length), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def get(path: str, *extra: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return b"\r\n".join([b"GET " + path.encode() + b" " + version, b"host: swapd",
                         *extra]) + b"\r\n\r\n"


def body_for(path: str) -> bytes:
    return CHAT if path in (INFERENCE, OLLAMA) else SHOW


async def refused_and_closed(conn: RawConnection, allowed: frozenset[int] = REFUSED,
                             ) -> RawAnswer | None:
    """The answer (None if the server just closed): a status in ``allowed``, then the
    close, with no second answer before it. For requests whose framing is in doubt:
    what follows them on the connection cannot be trusted to be a request."""
    answer = await conn.answer_or_close(DEADLINE)
    if answer is not None:
        assert answer.status in allowed, (answer.status_line, answer.body[:300])
    await conn.send(get("/health"))  # a connection kept alive would answer it
    after = await conn.answer_or_close(DEADLINE)
    assert after is None, f"the connection was kept after the refusal: {after}"
    return answer


async def refused_then_in_step(conn: RawConnection, allowed: frozenset[int] = REFUSED,
                               ) -> RawAnswer | None:
    """The answer (None if the server just closed), a status in ``allowed``; then either
    the close or, on a connection kept alive, a normal answer to the next request."""
    answer = await conn.answer_or_close(DEADLINE)
    if answer is None:
        assert await conn.closed(DEADLINE) == b""
        return None
    assert answer.status in allowed, (answer.status_line, answer.body[:300])
    if answer.headers.get("connection", "").lower() == "close":
        assert await conn.closed(DEADLINE) == b""
        return answer
    await conn.send(get("/health", b"connection: close"))
    after = await conn.answer_or_close(DEADLINE)
    assert after is None or after.status == 200, after
    return answer


async def healthy(port: int) -> None:
    """A fresh connection still gets a normal answer."""
    async with await RawConnection.open(port) as conn:
        await conn.send(get("/health", b"connection: close"))
        answer = await conn.answer(DEADLINE)
        assert answer.status == 200, answer


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not logged, logged[0].getMessage()


# -- the fixed corpus: heads ----------------------------------------------------------


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("shape", [
    pytest.param("one_big_header"),
    pytest.param("many_lines"),
    "trickled",
])
async def test_a_head_past_16_kib_is_refused(tmp_path: Path, path: str, shape: str) -> None:
    """Just past the limit when sent at once; well past it (24 KiB) when trickled in
    1 KiB pieces, as a server that checks the size only while a head is incomplete can
    take one last read past its limit."""
    if shape == "many_lines":
        extra = [b"x-pad-%d: %s" % (i, b"p" * 500) for i in range(MAX_HEAD_BYTES // 500)]
    else:
        size = MAX_HEAD_BYTES * 3 // 2 if shape == "trickled" else MAX_HEAD_BYTES
        extra = [b"x-pad: " + b"p" * size]
    request = post(path, body_for(path), *extra)
    async with wire_server(tmp_path) as (_, port), await RawConnection.open(port) as conn:
        if shape == "trickled":
            for start in range(0, len(request), 1024):
                if not await conn.send(request[start:start + 1024]):
                    break
                await trio.sleep(0.001)
        else:
            await conn.send(request)
        await refused_and_closed(conn)
        await healthy(port)


@pytest.mark.parametrize("path", ROUTES)
async def test_more_than_100_header_lines_are_refused(tmp_path: Path, path: str) -> None:
    extra = [b"x-%d: y" % i for i in range(MAX_HEADERS + 50)]
    async with wire_server(tmp_path) as (_, port), await RawConnection.open(port) as conn:
        await conn.send(post(path, body_for(path), *extra))
        await refused_and_closed(conn)


async def test_a_trickled_head_is_cut_at_timeouts_headers(tmp_path: Path) -> None:
    """Slowloris: a byte of a head every 50 ms, never complete, is closed (or refused)
    once ``timeouts.headers`` has passed, whatever the bytes keep doing."""
    head = post(INFERENCE, CHAT)[:-len(CHAT) - 4] + b"\r\n" + b"x-slow: " + b"s" * 10000
    async with wire_server(tmp_path, headers=SHORT) as (_, port), \
            await RawConnection.open(port) as conn:

        async def trickle() -> None:
            for byte in head:
                if not await conn.send(bytes([byte])):
                    return
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            answer = await conn.answer_or_close(DEADLINE)
            assert answer is None or answer.status in {408, 400, 431}, answer
            nursery.cancel_scope.cancel()
        await healthy(port)


@pytest.mark.parametrize("after", ["nothing", "an_answer"])
async def test_an_idle_connection_is_closed(tmp_path: Path, after: str) -> None:
    """A connection that sends nothing, at first or after an answer (keep-alive), is
    closed at ``timeouts.headers``."""
    async with wire_server(tmp_path, headers=IDLE) as (_, port), \
            await RawConnection.open(port) as conn:
        if after == "an_answer":
            await conn.send(get("/v1/models"))
            assert (await conn.answer(DEADLINE)).status == 200
        assert await conn.answer_or_close(DEADLINE) is None


# -- bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("expect", [False, pytest.param(True)])
async def test_a_declared_body_past_max_body_is_413_before_it_is_sent(
        tmp_path: Path, path: str, expect: bool) -> None:
    """And with ``Expect: 100-continue``, 413 instead of the 100."""
    extra = [b"expect: 100-continue"] if expect else []
    async with wire_server(tmp_path, body=60.0) as (_, port), \
            await RawConnection.open(port) as conn:
        await conn.send(post(path, b"", *extra, length=MAX_BODY + 1))
        answer = await conn.answer(DEADLINE)
        assert answer.status == 413, answer
        assert answer.error_code() == "body_too_large"


@pytest.mark.parametrize("path", ROUTES)
async def test_a_stalled_body_is_408_at_timeouts_body(tmp_path: Path, path: str) -> None:
    async with wire_server(tmp_path, body=SHORT) as (running, port), \
            await RawConnection.open(port) as conn:
        await conn.send(post(path, body_for(path)[:5], length=len(body_for(path))))
        answer = await conn.answer(DEADLINE)
        assert answer.status == 408, answer
        assert answer.error_code() == "body_timeout"
        assert running.supervisor.state.value == "idle"


@pytest.mark.parametrize("path", ROUTES)
async def test_a_chunked_body_past_max_body_is_413(tmp_path: Path, path: str) -> None:
    chunk = b"%x\r\n%s\r\n" % (16 * 1024, b"x" * 16 * 1024)
    head = post(path, b"", b"transfer-encoding: chunked")
    head = head.replace(b"content-length: 0\r\n", b"")
    async with wire_server(tmp_path) as (_, port), await RawConnection.open(port) as conn:

        async def send_body() -> None:
            await conn.send(head)
            for _ in range(2 * MAX_BODY // (16 * 1024)):
                if not await conn.send(chunk):
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body)
            answer = await conn.answer(DEADLINE)
            assert answer.status == 413, answer
        await healthy(port)


@pytest.mark.parametrize(("path", "length"), [
    *[(path, length) for path in ROUTES for length in [
        b"-1", b"1e3", b"0x10", b"+5", b"5 5", b"99999999999999999999", b"abc", b""]],
    *[(path, length) for path in ROUTES for length in [b"5,5", b"5, 5"]],
])
async def test_a_malformed_content_length_is_refused(tmp_path: Path, path: str,
                                                     length: bytes) -> None:
    request = post(path, b"{   }").replace(b"content-length: 5",
                                            b"content-length: " + length)
    async with wire_server(tmp_path) as (running, port), \
            await RawConnection.open(port) as conn:
        await conn.send(request)
        await refused_and_closed(conn, REFUSED | {413})
        assert running.supervisor.state.value == "idle"


# -- smuggling ------------------------------------------------------------------------

SMUGGLED = post("/swapd/load", json.dumps({"model": "b"}).encode())
"""What a smuggled request does: load model ``b`` (seen in the supervisor's state)."""

CHUNKED_SMUGGLE = b"0\r\n\r\n" + SMUGGLED
FRAMINGS: dict[str, tuple[list[bytes], bytes]] = {
    "content_length_and_chunked": (
        [b"content-length: %d" % len(CHUNKED_SMUGGLE), b"transfer-encoding: chunked"],
        CHUNKED_SMUGGLE),
    "chunked_and_content_length": (
        [b"transfer-encoding: chunked", b"content-length: %d" % len(CHUNKED_SMUGGLE)],
        CHUNKED_SMUGGLE),
    "two_content_lengths": ([b"content-length: 5", b"content-length: %d" % (
        5 + len(SMUGGLED))], b"12345" + SMUGGLED),
    "same_content_length_twice": ([b"content-length: 2", b"content-length: 2"],
                                  b"{}" + SMUGGLED),
    "gzip_chunked": ([b"transfer-encoding: gzip, chunked"], CHUNKED_SMUGGLE),
    "chunked_identity": ([b"transfer-encoding: chunked, identity"], CHUNKED_SMUGGLE),
    "chunked_twice": ([b"transfer-encoding: chunked", b"transfer-encoding: chunked"],
                      CHUNKED_SMUGGLE),
    "space_before_colon": ([b"transfer-encoding : chunked",
                            b"content-length: %d" % len(CHUNKED_SMUGGLE)], CHUNKED_SMUGGLE),
    "folded_coding": ([b"transfer-encoding:", b" chunked",
                       b"content-length: %d" % len(CHUNKED_SMUGGLE)], CHUNKED_SMUGGLE),
    "tab_coding": ([b"transfer-encoding:\tchunked\t",
                    b"content-length: %d" % len(CHUNKED_SMUGGLE)], CHUNKED_SMUGGLE),
    "xchunked": ([b"transfer-encoding: xchunked",
                  b"content-length: %d" % len(CHUNKED_SMUGGLE)], CHUNKED_SMUGGLE),
}


def smuggling(path: str, framing: str) -> bytes:
    extra, body = FRAMINGS[framing]
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"host: swapd", *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


LAX_FRAMINGS = {
    "content_length_and_chunked": "reads the chunked body and ignores Content-Length "
                                  "(h11: Transfer-Encoding wins)",
    "chunked_and_content_length": "reads the chunked body and ignores Content-Length",
    "same_content_length_twice": "merges identical Content-Length headers (h11)",
    "gzip_chunked": "answers 501 (h11) where the spec wants 400",
    "chunked_identity": "answers 501 (h11) where the spec wants 400",
    "chunked_twice": "accepts a repeated Transfer-Encoding",
    "folded_coding": "accepts an obs-fold (h11 joins the continuation line)",
    "tab_coding": "reads the chunked body and ignores Content-Length",
    "xchunked": "answers 501 (h11) where the spec wants 400",
}


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("framing", [
    pytest.param(name) if name in LAX_FRAMINGS
    else name for name in FRAMINGS])
async def test_ambiguous_framing_is_400_and_closed(tmp_path: Path, path: str,
                                                   framing: str) -> None:
    async with wire_server(tmp_path) as (_, port), await RawConnection.open(port) as conn:
        await conn.send(smuggling(path, framing))
        answer = await refused_and_closed(conn, frozenset({400}))
        assert answer is not None


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("framing", [
    pytest.param(name) if name in {
        "content_length_and_chunked", "chunked_and_content_length", "tab_coding",
        "folded_coding"}
    else name for name in FRAMINGS if name != "same_content_length_twice"])
async def test_a_request_in_a_body_is_never_run(tmp_path: Path, path: str,
                                                framing: str) -> None:
    """However the framing is read, the bytes of a body never become a request of
    their own: the load of ``b`` they carry never happens, no second answer comes.
    (Two equal lengths frame the body without doubt: what follows it is a request.)"""
    async with wire_server(tmp_path) as (running, port), \
            await RawConnection.open(port) as conn:
        await conn.send(smuggling(path, framing))
        first = await conn.answer_or_close(DEADLINE)
        # A second answer is a second request read out of the first one's body.
        second = await conn.answer_or_close(DEADLINE) if first is not None and \
            first.headers.get("connection") != "close" else None
        assert second is None or second.status >= 400, f"a second request ran: {second}"
        await healthy(port)
        assert running.supervisor.profile_state("b").value == "idle", "the load ran"


# -- request lines and header lines ---------------------------------------------------

MALFORMED: dict[str, bytes] = {
    "bad_method_char": b"G(T /health HTTP/1.1\r\nhost: swapd\r\n\r\n",
    "no_version": b"GET /health\r\nhost: swapd\r\n\r\n",
    "http_0_9_line": b"GET /health\r\n\r\n",
    "http_2_0": b"GET /health HTTP/2.0\r\nhost: swapd\r\n\r\n",
    "http_0_9": b"GET /health HTTP/0.9\r\nhost: swapd\r\n\r\n",
    "http_1_2": b"GET /health HTTP/1.2\r\nhost: swapd\r\n\r\n",
    "lowercase_http": b"GET /health http/1.1\r\nhost: swapd\r\n\r\n",
    "two_spaces": b"GET  /health HTTP/1.1\r\nhost: swapd\r\n\r\n",
    "absolute_form": b"GET http://swapd/health HTTP/1.1\r\nhost: swapd\r\n\r\n",
    "asterisk": b"OPTIONS * HTTP/1.1\r\nhost: swapd\r\n\r\n",
    "bare_cr": b"GET /health HTTP/1.1\rhost: swapd\r\n\r\n",
    "bare_cr_in_header": b"GET /health HTTP/1.1\r\nhost: swapd\rx-a: b\r\n\r\n",
    "nul_in_target": b"GET /he\x00alth HTTP/1.1\r\nhost: swapd\r\n\r\n",
    "nul_in_header": b"GET /health HTTP/1.1\r\nhost: swapd\r\nx-a: a\x00b\r\n\r\n",
    "obs_fold": b"GET /health HTTP/1.1\r\nhost: swapd\r\nx-a: a\r\n  folded\r\n\r\n",
    "space_in_header_name": b"GET /health HTTP/1.1\r\nhost: swapd\r\nx a: b\r\n\r\n",
    "no_colon": b"GET /health HTTP/1.1\r\nhost: swapd\r\nx-a\r\n\r\n",
    "empty_header_name": b"GET /health HTTP/1.1\r\nhost: swapd\r\n: b\r\n\r\n",
    "no_host": b"GET /health HTTP/1.1\r\n\r\n",
    "two_hosts": b"GET /health HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
    "leading_space": b" GET /health HTTP/1.1\r\nhost: swapd\r\n\r\n",
    "post_absolute_form": post("http://swapd/v1/chat/completions", CHAT),
    "post_http_2_0": post(INFERENCE, CHAT, version=b"HTTP/2.0"),
    "post_obs_fold": post(INFERENCE, CHAT, b"x-a: a", b" folded"),
    "post_nul_in_header": post(INFERENCE, CHAT, b"x-a: a\x00b"),
}

LAX_LINES = {
    "http_2_0": "answers an HTTP/2.0 request line as HTTP/1.1 (h11 takes any HTTP/d.d)",
    "http_0_9": "answers an HTTP/0.9 request line (h11 takes any HTTP/d.d)",
    "http_1_2": "answers an HTTP/1.2 request line (h11 takes any HTTP/d.d)",
    "obs_fold": "accepts obs-fold continuation lines (h11 joins them)",
    "post_http_2_0": "answers an HTTP/2.0 request line as HTTP/1.1",
    "post_obs_fold": "accepts obs-fold continuation lines",
}


@pytest.mark.parametrize("case", [
    pytest.param(name) if name in LAX_LINES else name
    for name in MALFORMED])
async def test_a_malformed_request_line_or_header_is_400(tmp_path: Path, case: str) -> None:
    allowed = REFUSED | ({505} if "http_" in case else set())
    async with wire_server(tmp_path) as (running, port), \
            await RawConnection.open(port) as conn:
        await conn.send(MALFORMED[case])
        await refused_then_in_step(conn, frozenset(allowed))
        assert running.supervisor.state.value == "idle"  # no chat request got through


@pytest.mark.parametrize("request_bytes", [
    get("/health").replace(b"\r\n", b"\n"),
    post(INFERENCE, CHAT).replace(b"\r\n", b"\n"),
    get("/health").replace(b"host: swapd\r\n", b"host: swapd\n"),
], ids=["get", "chat", "one_line"])
async def test_bare_lf_line_ends_are_read_as_crlf_or_refused(tmp_path: Path,
                                                             request_bytes: bytes) -> None:
    """RFC 9112 §2.2 lets a server accept a bare LF as a line end (h11 does): either a
    normal answer, with the connection still in step, or a refusal and a close."""
    async with wire_server(tmp_path) as (_, port), await RawConnection.open(port) as conn:
        await conn.send(request_bytes + get("/v1/models", b"connection: close"))
        first = await conn.answer_or_close(LOAD_DEADLINE)
        if first is None or first.status in REFUSED or first.headers.get(
                "connection", "").lower() == "close":
            assert await conn.closed(DEADLINE) == b""
            return
        assert first.status == 200, first
        second = await conn.answer(DEADLINE)
        assert second.status == 200 and json.loads(second.body)["object"] == "list"


# -- HTTP/1.0, Expect, pipelining, keep-alive -----------------------------------------


@pytest.mark.parametrize("keep_alive", [False, True])
async def test_http_1_0_without_host_is_answered(tmp_path: Path, keep_alive: bool) -> None:
    """Answered; closed after, unless it asked for keep-alive and the server kept it, in
    which case a second request on it is answered too."""
    extra = b"connection: keep-alive\r\n" if keep_alive else b""
    request = b"GET /v1/models HTTP/1.0\r\n" + extra + b"\r\n"
    async with wire_server(tmp_path) as (_, port), await RawConnection.open(port) as conn:
        await conn.send(request)
        answer = await conn.answer(DEADLINE)
        assert answer.status == 200 and json.loads(answer.body)["object"] == "list"
        if not keep_alive or answer.headers.get("connection", "").lower() != "keep-alive":
            assert await conn.closed(DEADLINE) == b""
            return
        await conn.send(b"GET /health HTTP/1.0\r\n\r\n")
        assert (await conn.answer(DEADLINE)).status == 200


@pytest.mark.parametrize("path", ROUTES)
async def test_expect_100_continue_is_answered_before_the_body(tmp_path: Path,
                                                               path: str) -> None:
    body = body_for(path)
    async with wire_server(tmp_path) as (_, port), await RawConnection.open(port) as conn:
        await conn.send(post(path, b"", b"expect: 100-continue", length=len(body)))
        interim = await conn.answer(DEADLINE)
        assert interim.status == 100, interim
        await conn.send(body)
        answer = await conn.answer(LOAD_DEADLINE)
        assert answer.status == 200, answer


PIPELINES = {
    "two_chats": [post(INFERENCE, CHAT), post(INFERENCE, CHAT)],
    "health_then_chat": [get("/health"), post(INFERENCE, CHAT)],
    "three": [get("/v1/models"), post(INFERENCE, CHAT), post(QUART, SHOW)],
    "chat_models_show_health": [post(INFERENCE, CHAT), get("/v1/models"),
                                post(QUART, SHOW), get("/health")],
    "http_1_0_then_more": [get("/health", version=b"HTTP/1.0"), get("/v1/models")],
    "close_then_more": [get("/health", b"connection: close"), get("/v1/models")],
}


def kind(answer: RawAnswer) -> str:
    """Which request an answer belongs to, from its body."""
    body = json.loads(answer.body)
    if "choices" in body:
        return "chat"
    if body.get("object") == "list":
        return "models"
    if "status" in body:
        return "health"
    return "show"


EXPECTED_KIND = {"/health": "health", "/v1/models": "models", INFERENCE: "chat",
                 QUART: "show"}


@pytest.mark.parametrize("pipeline", [
    pytest.param(name)
    if name in {"http_1_0_then_more", "close_then_more"} else name
    for name in PIPELINES])
async def test_pipelined_requests_are_answered_in_order_or_closed(
        tmp_path: Path, pipeline: str, caplog: pytest.LogCaptureFixture) -> None:
    """Several requests in one send: their answers in order, whole and 200, or the
    connection closed after some of them (never reordered, merged, or a 400 for a
    request that was fine)."""
    requests = PIPELINES[pipeline]
    expected = [EXPECTED_KIND[r.split(b" ")[1].decode()] for r in requests]
    async with wire_server(tmp_path) as (_, port), await RawConnection.open(port) as conn:
        await conn.send(b"".join(requests))
        got: list[str] = []
        for _ in requests:
            answer = await conn.answer_or_close(LOAD_DEADLINE)
            if answer is None:
                break
            assert answer.status == 200, (len(got), answer)
            got.append(kind(answer))
        assert got == expected[:len(got)] and got, got
        if len(got) < len(requests):
            assert await conn.closed(DEADLINE) == b""
        await healthy(port)
    no_tracebacks(caplog)


async def test_keep_alive_serves_inference_and_discovery_in_turn(tmp_path: Path) -> None:
    """Inference answers keep the connection; a request handed to hypercorn (discovery,
    operations) is answered with ``Connection: close`` and the connection closes after
    it, so that the client's next request is read by the fast path again."""
    async with wire_server(tmp_path) as (_, port):
        conn = await RawConnection.open(port)
        try:
            for request in [post(INFERENCE, CHAT), post(INFERENCE, CHAT), get("/v1/models"),
                            post(QUART, SHOW), post(INFERENCE, CHAT), get("/health")]:
                assert await conn.send(request)
                answer = await conn.answer(LOAD_DEADLINE)
                assert answer.status == 200, answer
                path = request.split(b" ")[1].decode()
                assert kind(answer) == EXPECTED_KIND[path]
                if path == INFERENCE:
                    assert answer.headers.get("connection", "keep-alive") != "close"
                else:
                    assert answer.headers["connection"].lower() == "close"
                    assert await conn.closed(DEADLINE) == b""
                    await conn.aclose()
                    conn = await RawConnection.open(port)
        finally:
            await conn.aclose()


# -- clients that leave ---------------------------------------------------------------


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("leaves", ["mid_head", "mid_body", "after_request",
                                    "after_expect"])
async def test_a_client_that_leaves_does_not_hurt_the_server(
        tmp_path: Path, path: str, leaves: str, caplog: pytest.LogCaptureFixture) -> None:
    request = post(path, body_for(path))
    cut = {"mid_head": 30, "mid_body": len(request) - 5, "after_request": len(request)}
    async with wire_server(tmp_path) as (running, port):
        for _ in range(3):  # again and again: nothing leaks, nothing piles up
            async with await RawConnection.open(port) as conn:
                if leaves == "after_expect":
                    await conn.send(post(path, b"", b"expect: 100-continue",
                                         length=len(body_for(path))))
                    assert (await conn.answer(DEADLINE)).status == 100
                else:
                    await conn.send(request[:cut[leaves]])
            await healthy(port)
        async with await RawConnection.open(port) as conn:  # and serves whole requests
            await conn.send(request)
            answer = await conn.answer(LOAD_DEADLINE)
            # A load asked for by a request whose client left goes on (llama.cpp's): a
            # second one is then told so.
            assert answer.status == 200 or (
                path == ROUTER and answer.status == 400 and b"already running" in answer.body
            ), answer
        with trio.fail_after(DEADLINE):
            while running.supervisor.n_inflight:
                await trio.sleep(0.02)
    no_tracebacks(caplog)


# -- the fuzzer -----------------------------------------------------------------------

FUZZ_EXAMPLES = 200
FUZZ_QUIET = 0.1
"""After an answer on a kept-alive connection, this long without a byte ends the
exchange (a later answer would go unchecked, never make the test fail)."""

SEEDS = [
    get("/health"),
    get("/v1/models", b"accept: application/json"),
    post(INFERENCE, CHAT),
    post(QUART, SHOW),
    post("/swapd/load", b'{"model": "a"}'),
    post(INFERENCE, b"", b"transfer-encoding: chunked").replace(b"content-length: 0\r\n",
                                                                b"") + b"%x\r\n%s\r\n0\r\n\r\n"
    % (len(CHAT), CHAT),
    post(INFERENCE, b"", b"expect: 100-continue", length=len(CHAT)) + CHAT,
]
"""Valid requests the fuzzer mutates (it sends each once, unmutated, first)."""

INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b"\x7f", b"\xff", b",",
           b"\r\n\r\n", b"\r\n ", b"content-length: 3\r\n", b"transfer-encoding: chunked\r\n",
           b"connection: close\r\n", b"expect: 100-continue\r\n", b"0\r\n\r\n"]
METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"TRACE", b"PRI", b"get", b"G T",
           b"", b"POST\x00", b"\xffPOST"]
TARGETS = [b"/", b"*", b"http://swapd/health", b"//x", b"/v1/chat/completions?x=1",
           b"/%00", b"/\xff", b"", b"/a b", b"/" + b"a" * 9000]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 ", b"HTTP/1",
            b"HTTPS/1.1", b"http/1.1", b"HTTP/1.1\x00", b"", b"HTTP/11.1"]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A valid request with a few mutations, and whether the client half-closes after
    sending it (so a truncated one ends at once, not at a deadline)."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "method",
                                   "target", "version", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        line_start, line_end = data.rfind(b"\n", 0, at) + 1, data.find(b"\n", at)
        line_end = len(data) if line_end < 0 else line_end + 1
        first_line = data[:data.find(b"\n") if b"\n" in data else len(data)]
        parts = bytes(first_line).split(b" ")
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from(INSERTS))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 4))]
        elif op == "duplicate":
            data[line_start:line_start] = data[line_start:line_end]
        elif op in ("method", "target", "version") and len(parts) == 3:
            index = ["method", "target", "version"].index(op)
            parts[index] = draw(st.sampled_from({"method": METHODS, "target": TARGETS,
                                                 "version": VERSIONS}[op]))
            data[:len(first_line)] = b" ".join(parts)
        elif op == "truncate":
            del data[at:]
    return bytes(data), draw(st.booleans())


async def fuzz_one(port: int, request: bytes, half_close: bool) -> list[str]:
    """Send one request on a fresh connection; every answer that comes must be
    well-formed and below 500, and the connection must end or go quiet in time."""
    seen: list[str] = []
    async with await RawConnection.open(port) as conn:
        await conn.send(request)
        if half_close:
            with suppress(trio.BrokenResourceError):
                await conn.stream.send_eof()
        with trio.fail_after(LOAD_DEADLINE):
            while True:
                try:
                    answer = await conn.answer_or_close(LOAD_DEADLINE)
                except ServerClosed as closed:
                    raise AssertionError(f"answer cut short: {closed.received!r}") from None
                if answer is None:
                    return seen
                seen.append(answer.status_line)
                assert answer.status < 500, (answer.status_line, answer.body[:300])
                if answer.status >= 200 and await conn.nothing_within(FUZZ_QUIET):
                    return seen  # kept alive and quiet: the exchange is over

async def test_fuzzed_requests_get_a_well_formed_answer_below_500_or_a_close(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with wire_server(tmp_path, headers=SHORT, body=SHORT) as (_, port):
        statuses: list[str] = []

        def check(request: bytes, half_close: bool) -> None:
            try:
                seen = trio.from_thread.run(fuzz_one, port, request, half_close)
            except AssertionError as error:
                raise AssertionError(f"{request[:400]!r}: {error}") from None
            statuses.extend(seen)

        for seed in SEEDS:
            statuses.extend(await fuzz_one(port, seed, False))
        assert all(" 200" in s or " 100" in s for s in statuses), statuses

        @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None,
                  deadline=None, phases=(Phase.generate, Phase.shrink),
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(mutated())
        def fuzz(case: tuple[bytes, bool]) -> None:
            check(*case)

        await trio.to_thread.run_sync(fuzz)
        await healthy(port)
        assert any(" 400" in s for s in statuses)  # it reached the parser's refusals
    no_tracebacks(caplog)

