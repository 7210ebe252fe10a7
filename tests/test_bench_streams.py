"""The pieces of the bench's ``streams`` section: the paced stand-in, the floor relay, the
stream client and the table's extra columns.

The stand-in must speak llama-server's streaming framing exactly (one ``data:`` event per
HTTP chunk, ``[DONE]``, the ``0`` chunk, then a close), or what the bench measures
through swapd is not what swapd relays in production. Real processes, real sockets; time
is only ever a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bench.floor import __file__ as FLOOR
from bench.paced import __file__ as PACED
from bench.streamclient import run as run_stream_client
from bench.table import render
from swapd.config.flags import parse_help_flags

DEADLINE_S = 10.0
"""Turns a hang into a failure; never a measurement."""


def _port_from(proc: subprocess.Popen[bytes], marker: bytes) -> int:
    """Read ``proc``'s stderr until the line with ``marker``; the port ends that line."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()  # raw reads: a buffered readline would hide lines from select
    deadline = time.monotonic() + DEADLINE_S
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            seen += os.read(fd, 4096)
            for line in seen.split(b"\n")[:-1]:  # complete lines only
                if marker in line:
                    return int(line.strip().rsplit(b":", 1)[1])
    raise AssertionError(f"no {marker!r} line within {DEADLINE_S:g}s: {seen!r}")


@contextmanager
def _process(argv: list[str], marker: bytes) -> Iterator[int]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        yield _port_from(proc, marker)
    finally:
        proc.kill()
        proc.wait(DEADLINE_S)
        assert proc.stderr is not None
        proc.stderr.close()


@contextmanager
def _stand_in(*flags: str) -> Iterator[int]:
    # The argv swapd gives its child, plus flags the stand-in must ignore.
    with _process([sys.executable, PACED, "--model", "/m/x.gguf", "--host", "127.0.0.1",
                   "--port", "0", "--alias", "paced", "--ctx-size", "8192",
                   "--n-gpu-layers", "-1", "--jinja", *flags], b"listening on") as port:
        yield port


def _exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(request)
        out = b""
        while data := sock.recv(65536):
            out += data
    return out


def _post(body: dict[str, object], close: bool = False) -> bytes:
    raw = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"%sContent-Length: %d\r\n\r\n%s" % (b"Connection: close\r\n" if close else b"",
                                                 len(raw), raw))


def _chunks(answer: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(head, every chunk's data, what follows the 0 chunk) of a chunked answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    chunks = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return head, chunks, body
        chunks.append(body[:size])
        assert body[size:size + 2] == b"\r\n"
        body = body[size + 2:]


def _check_stream(answer: bytes, tokens: int) -> None:
    head, chunks, rest = _chunks(answer)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert b"Content-Type: text/event-stream" in head
    assert b"Connection: close" not in head  # llama-server closes without saying so
    assert rest == b"\r\n"  # the 0 chunk, no trailers, then the close
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"data:") == 1
               for c in chunks)  # one event per HTTP chunk
    events = [json.loads(c[6:]) for c in chunks[:-1]]
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [e["choices"][0]["delta"].get("content") for e in events[1:-1]] == [" tok"] * tokens
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert {e["object"] for e in events} == {"chat.completion.chunk"}


def test_stand_in_streams_in_llama_servers_framing_then_closes() -> None:
    with _stand_in("--paced-interval-ms", "1") as port:
        _check_stream(_exchange(port, _post({"stream": True, "max_tokens": 5})), 5)
        # a burst: the same framing, written as fast as the socket takes it
        _check_stream(_exchange(port, _post({"stream": True, "max_tokens": 300,
                                             "paced_interval_ms": 0})), 300)


def test_stand_in_answers_health_models_and_small_requests() -> None:
    with _stand_in() as port:
        health = _exchange(port, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert health.startswith(b"HTTP/1.1 200 OK\r\n")
        assert json.loads(health.partition(b"\r\n\r\n")[2]) == {"status": "ok"}
        models = _exchange(port, b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert json.loads(models.partition(b"\r\n\r\n")[2])["data"][0]["id"] == "paced"
        small = _exchange(port, _post({"max_tokens": 2}, close=True))
        answer = json.loads(small.partition(b"\r\n\r\n")[2])
        assert answer["choices"][0]["message"]["content"] == " tok tok"


def test_stand_in_help_lists_the_flags_swapd_passes() -> None:
    """swapd's preflight checks a profile's flags against ``--help``."""
    out = subprocess.run([sys.executable, PACED, "--help"], capture_output=True, text=True,
                         timeout=DEADLINE_S, check=True).stdout
    assert {"--model", "--host", "--port", "--alias",
            "--paced-interval-ms", "--paced-tokens"} <= parse_help_flags(out)


def test_floor_relay_passes_a_stream_through_unchanged() -> None:
    with _stand_in("--paced-interval-ms", "1") as upstream, _process(
            [sys.executable, FLOOR, "--port", "0", "--upstream-port", str(upstream)],
            b"floor relay listening on") as floor:
        _check_stream(_exchange(floor, _post({"stream": True, "max_tokens": 20})), 20)


def test_stream_client_counts_events_and_gaps() -> None:
    streams, tokens = 3, 7
    with _stand_in("--paced-interval-ms", "1") as port:
        body = json.dumps({"stream": True, "max_tokens": tokens}).encode()
        result = asyncio.run(run_stream_client(port, streams, body, "/v1/chat/completions",
                                               DEADLINE_S))
    assert result["errors"] == 0, result["error_examples"]
    per_stream = tokens + 3  # role, tokens, finish, [DONE]
    assert result["events"] == streams * per_stream
    assert result["gap_ms"]["n"] == streams * (per_stream - 1)


def test_stream_client_reports_a_refused_connection_as_an_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = asyncio.run(run_stream_client(port, 2, b"{}", "/v1/chat/completions",
                                               DEADLINE_S))
    assert result["errors"] == 2 and result["events"] == 0


def test_table_shows_floor_column_and_multiples_only_when_present() -> None:
    row = {"section": "9. streams", "metric": "relay CPU per chunk", "unit": "us",
           "direct": None, "swapd": 300.0, "floor": 100.0, "peer": None, "diff": 3.0,
           "ratio": False, "times": True, "target": "", "status": "", "others": None}
    text = render([row])
    assert text.splitlines()[0].split()[:5] == ["metric", "unit", "direct", "floor", "swapd"]
    assert "3.00x" in text and "llama-swap" not in text
    plain = {**row, "floor": None, "times": False, "diff": 200.0}
    assert "floor" not in render([plain]).splitlines()[0]
