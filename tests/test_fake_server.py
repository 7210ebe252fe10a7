"""The fake llama-server behaves like the real one, and misbehaves when told to.

Lifecycle tests rely on every switch here, so each one is checked against a real
subprocess. Real time is only ever a deadline (``fail_after``), never asserted.
"""

from __future__ import annotations

import json
import os
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

from swapd.core.footprint import Footprint
from swapd.core.process import diagnose
from tests.support.procs import (
    MARKER_VAR,
    ServerProcess,
    free_port,
    kill_leftovers,
    leftover_processes,
    open_server_process,
    port_is_taken,
)

DEADLINE_S = 10.0
"""Turns a hang into a failure; generous, because slow CI machines exist."""

LOADING_BODY = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


class Fake:
    """A running fake llama-server."""

    def __init__(self, server: ServerProcess, port: int) -> None:
        self.server = server
        self.process = server.process
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def stderr_text(self) -> str:
        return self.server.stderr_text

    async def wait_for_stderr(self, text: str) -> None:
        await self.server.wait_for_stderr(text)

    async def wait_for_line(self, text: str) -> str:
        return await self.server.wait_for_line(text)

    async def wait_healthy(self, client: httpx.AsyncClient) -> None:
        await self.server.wait_healthy(client, self.base_url)


@asynccontextmanager
async def running_fake(cmd: list[str], *flags: str, port: int | None = None,
                       ) -> AsyncIterator[Fake]:
    """Run the fake in its own process group; on exit, SIGKILL the group and reap."""
    port = free_port() if port is None else port
    argv = [*cmd, "--model", "/models/a.gguf", "--host", "127.0.0.1", "--port", str(port),
            "--alias", "a", *flags]
    async with open_server_process(argv) as server:
        yield Fake(server, port)


async def test_health_is_503_while_loading_then_200(fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd, "--fake-load-ms", "600") as fake, \
            httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            while True:  # the socket is bound before loading starts, as in llama-server
                try:
                    response = await client.get(f"{fake.base_url}/health")
                    break
                except httpx.TransportError:
                    await trio.sleep(0.005)
            assert response.status_code == 503
            assert response.json() == LOADING_BODY
            chat = await client.post(f"{fake.base_url}/v1/chat/completions",
                                     json={"messages": []})
            assert chat.status_code == 503
            assert "srv  llama_server: model loaded" not in fake.stderr_text

            await fake.wait_healthy(client)
            response = await client.get(f"{fake.base_url}/health")
            assert response.json() == {"status": "ok"}
            await fake.wait_for_stderr(
                f"srv  llama_server: listening on http://127.0.0.1:{fake.port}\n")
            assert "srv  llama_server: model loaded\n" in fake.stderr_text


async def test_never_healthy_stays_loading(fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd, "--fake-never-healthy") as fake, \
            httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_for_stderr("loading model")
            for _ in range(3):
                while True:
                    try:
                        response = await client.get(f"{fake.base_url}/health")
                        break
                    except httpx.TransportError:
                        await trio.sleep(0.005)
                assert response.status_code == 503
    assert fake.process.returncode == -signal.SIGKILL


async def test_exit_at_start_prints_stderr_and_exits_with_code(
        fake_server_cmd: list[str]) -> None:
    port = free_port()
    with trio.fail_after(DEADLINE_S):
        result = await trio.run_process(
            [*fake_server_cmd, "--port", str(port), "--fake-exit-at-start", "7",
             "--fake-stderr", "error: invalid argument: --bogus"],
            check=False, capture_stderr=True, stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 7
    assert b"error: invalid argument: --bogus\n" in result.stderr
    assert not port_is_taken(port)  # it exited before binding


async def test_port_in_use_exits_1_like_llama_server(fake_server_cmd: list[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with trio.fail_after(DEADLINE_S):
            result = await trio.run_process(
                [*fake_server_cmd, "--host", "127.0.0.1", "--port", str(port)],
                check=False, capture_stderr=True, stdin=subprocess.DEVNULL,
            )
    assert result.returncode == 1
    assert b"couldn't bind HTTP server socket" in result.stderr


async def test_port_0_reports_the_bound_port(fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd, port=0) as fake, httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            line = await fake.wait_for_line("listening on http://127.0.0.1:")
            port = int(line.rsplit(":", 1)[1])
            assert port != 0
            response = await client.get(f"http://127.0.0.1:{port}/health")
            assert response.status_code == 200


async def test_accepts_llama_server_flags_and_answers_like_it(
        fake_server_cmd: list[str]) -> None:
    flags = ["--ctx-size", "8192", "--n-gpu-layers", "-1", "--jinja", "--flash-attn", "on",
             "--cache-type-k", "q8_0", "-np", "2", "--no-webui"]
    async with running_fake(fake_server_cmd, *flags) as fake, httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            pid = str(fake.process.pid)

            models = await client.get(f"{fake.base_url}/v1/models")
            assert models.headers["x-fake-pid"] == pid
            body = models.json()
            assert [m["name"] for m in body["models"]] == ["a"]
            assert [m["id"] for m in body["data"]] == ["a"]
            assert body["data"][0]["meta"]["n_ctx"] == 8192
            assert body["data"][0]["meta"]["n_ctx_train"] == 8192
            assert (await client.get(f"{fake.base_url}/models")).json() == body

            props = (await client.get(f"{fake.base_url}/props")).json()
            assert props["default_generation_settings"]["n_ctx"] == 8192
            assert props["model_alias"] == "a"
            assert props["model_path"] == "/models/a.gguf"
            assert props["total_slots"] == 2
            assert "build_info" in props

            chat = await client.post(f"{fake.base_url}/v1/chat/completions",
                                     json={"model": "x", "messages": [], "max_tokens": 3})
            answer = chat.json()
            assert answer["object"] == "chat.completion"
            assert answer["model"] == "a"
            assert answer["choices"][0]["message"]["content"] == f"fake:a:{pid} token token"
            assert answer["choices"][0]["finish_reason"] == "length"

            completion = (await client.post(f"{fake.base_url}/v1/completions",
                                            json={"prompt": "hi"})).json()
            assert completion["choices"][0]["text"].startswith(f"fake:a:{pid} ")

            embedding = (await client.post(f"{fake.base_url}/v1/embeddings",
                                           json={"input": ["x", "y"]})).json()
            assert [d["index"] for d in embedding["data"]] == [0, 1]

            echo = (await client.post(f"{fake.base_url}/v1/responses",
                                      json={"model": "m", "input": "hi"})).json()
            assert echo["path"] == "/v1/responses"
            assert echo["body"] == {"model": "m", "input": "hi"}
            assert echo["model"] == "a"

            missing = await client.get(f"{fake.base_url}/nope")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == 404
            assert "fake: ignoring flags --n-gpu-layers" in fake.stderr_text


async def test_streaming_chunks_are_openai_shaped(fake_server_cmd: list[str]) -> None:
    request = {"messages": [], "stream": True, "stream_options": {"include_usage": True}}
    async with running_fake(fake_server_cmd, "--fake-tokens", "5") as fake, \
            httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            async with client.stream("POST", f"{fake.base_url}/v1/chat/completions",
                                     json=request) as response:
                assert response.headers["content-type"] == "text/event-stream"
                assert response.headers["transfer-encoding"] == "chunked"
                assert response.headers["x-fake-pid"] == str(fake.process.pid)
                lines = [line async for line in response.aiter_lines()]
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "a"
        assert {"id", "created", "choices"} <= chunk.keys()
    *answer, usage = chunks
    assert answer[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [c["choices"][0]["index"] for c in answer] == [0] * 7
    assert [c["choices"][0]["finish_reason"] for c in answer] == [None] * 6 + ["stop"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in answer)
    assert text == f"fake:a:{fake.process.pid}" + " token" * 4
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 5


async def test_completions_stream_without_usage(fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd, "--fake-tokens", "3") as fake, \
            httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            response = await client.post(f"{fake.base_url}/v1/completions",
                                         json={"prompt": "hi", "stream": True})
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == (
        f"fake:a:{fake.process.pid} token token")


async def test_keep_alive_serves_many_requests_on_one_connection(
        fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd, "--fake-token-delay-ms", "1") as fake, \
            httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
                response = await client.post(f"{fake.base_url}{path}",
                                             json={"messages": [], "prompt": "", "input": ""})
                assert response.status_code == 200
                assert response.headers["x-fake-pid"] == str(fake.process.pid)
                assert "connection" not in response.headers


async def test_a_streamed_answer_closes_the_connection(fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd) as fake, httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            received = await _post_until_closed(fake.port, {"messages": [], "stream": True})
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert b"Keep-Alive: timeout=5, max=100" in received
    assert b"Connection: close" not in received  # closed without saying so, as the real one


async def _post_until_closed(port: int, body: dict[str, object]) -> bytes:
    payload = json.dumps(body).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(payload), payload))
        received = bytearray()
        async for data in stream:  # until the server closes
            received += data
    return bytes(received)


async def test_crash_after_n_inference_requests(fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd, "--fake-crash-after", "2") as fake, \
            httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            first = await client.post(f"{fake.base_url}/v1/chat/completions",
                                      json={"messages": []})
            assert first.status_code == 200
            assert (await client.get(f"{fake.base_url}/props")).status_code == 200
            with pytest.raises(httpx.TransportError):
                await client.post(f"{fake.base_url}/v1/chat/completions",
                                  json={"messages": []})
            assert await fake.process.wait() == 3
            await fake.wait_for_stderr("crashing on purpose (--fake-crash-after 2)")


async def test_crash_mid_stream_after_k_chunks(fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd, "--fake-crash-mid-stream", "3") as fake, \
            httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            events: list[str] = []
            with pytest.raises(httpx.TransportError):
                async with client.stream("POST", f"{fake.base_url}/v1/chat/completions",
                                         json={"messages": [], "stream": True}) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line:
                            events.append(line)
            assert len(events) == 3
            assert "[DONE]" not in events[-1]
            assert await fake.process.wait() == 3


async def test_sigterm_exits_0(fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd) as fake, httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            fake.process.send_signal(signal.SIGTERM)
            assert await fake.process.wait() == 0
            await fake.wait_for_stderr("received SIGTERM\n")


async def test_sigterm_while_loading_takes_the_default_action(
        fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd, "--fake-never-healthy") as fake:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_for_stderr("loading model")
            fake.process.send_signal(signal.SIGTERM)
            assert await fake.process.wait() == -signal.SIGTERM


async def test_ignore_sigterm_needs_sigkill(fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd, "--fake-ignore-sigterm") as fake, \
            httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            fake.process.send_signal(signal.SIGTERM)
            # A pending signal is delivered before the process next runs user code, so an
            # answer after the kill() proves the SIGTERM arrived and was ignored.
            assert (await client.get(f"{fake.base_url}/health")).status_code == 200
            assert fake.process.returncode is None
            fake.process.kill()
            assert await fake.process.wait() == -signal.SIGKILL
        assert "received SIGTERM" not in fake.stderr_text


def _pgid_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[2])


async def test_grandchild_shares_the_group_and_outlives_the_child(
        fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd, "--fake-grandchild") as fake, \
            httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            props = (await client.get(f"{fake.base_url}/props")).json()
            grandchild = props["fake_grandchild_pid"]
            assert isinstance(grandchild, int)
            assert _pgid_of(grandchild) == _pgid_of(fake.process.pid) == fake.process.pid

            fake.process.kill()  # the direct child only, as a naive supervisor would
            await fake.process.wait()
            assert grandchild in {pid for pid, _ in leftover_processes(
                os.environ[MARKER_VAR])}
            assert port_is_taken(fake.port)  # the grandchild still holds the socket
        # running_fake's exit kills the group, grandchild included; the autouse
        # no_leftover_processes fixture checks that it is really gone.


async def test_leftover_detection_finds_and_kills_descendants() -> None:
    marker = os.environ[MARKER_VAR]
    process = await trio.lowlevel.open_process(["sleep", "1000"], stdin=subprocess.DEVNULL)
    try:
        assert process.pid in {pid for pid, _ in leftover_processes(marker)}
        killed = kill_leftovers(marker)
        assert (process.pid, "sleep 1000") in killed
    finally:
        with trio.move_on_after(DEADLINE_S, shield=True):
            process.kill()
            await process.wait()
    assert process.pid not in {pid for pid, _ in leftover_processes(marker)}


async def test_log_lines_have_llama_cpp_prefix_unless_disabled(
        fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd) as fake:
        with trio.fail_after(DEADLINE_S):
            line = await fake.wait_for_line("srv  llama_server: model loaded")
    assert re.fullmatch(r"\d+\.\d\d\.\d\d\d\.\d\d\d I srv  llama_server: model loaded", line)

    async with running_fake(fake_server_cmd, "--no-log-prefix") as fake:
        with trio.fail_after(DEADLINE_S):
            line = await fake.wait_for_line("listening on")
    assert line == f"srv  llama_server: listening on http://127.0.0.1:{fake.port}"


async def test_connection_closes_after_100_requests(fake_server_cmd: list[str]) -> None:
    async with running_fake(fake_server_cmd) as fake, httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            stream = await trio.open_tcp_stream("127.0.0.1", fake.port)
            async with stream:
                request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                await stream.send_all(request * 101)  # pipelined
                received = bytearray()
                async for data in stream:  # until the server closes
                    received += data
    responses = bytes(received).split(b"HTTP/1.1 ")[1:]
    assert len(responses) == 100
    assert all(b"Keep-Alive: timeout=5, max=100" in r for r in responses)
    assert [b"Connection: close" in r for r in responses] == [False] * 99 + [True]


async def test_linger_on_stream_until_the_client_disconnects(
        fake_server_cmd: list[str]) -> None:
    flags = ["--fake-linger-on-stream", "60000", "--fake-tokens", "1000",
             "--fake-token-delay-ms", "5"]
    async with running_fake(fake_server_cmd, *flags) as fake, httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            async with client.stream("POST", f"{fake.base_url}/v1/chat/completions",
                                     json={"messages": [], "stream": True}) as response:
                lines = response.aiter_lines()
                assert (await anext(lines)).startswith("data: ")
                fake.process.send_signal(signal.SIGTERM)
                await fake.wait_for_stderr("operator(): cleaning up before exit...")
                assert fake.process.returncode is None  # held open by the stream
            # closing the stream's connection releases it, as with llama-server
            assert await fake.process.wait() == 0


async def test_second_sigterm_terminates_immediately(fake_server_cmd: list[str]) -> None:
    flags = ["--fake-linger-on-stream", "60000", "--fake-tokens", "1000",
             "--fake-token-delay-ms", "5"]
    async with running_fake(fake_server_cmd, *flags) as fake, httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await fake.wait_healthy(client)
            async with client.stream("POST", f"{fake.base_url}/v1/chat/completions",
                                     json={"messages": [], "stream": True}) as response:
                # keep a reference: a dropped, unfinished line iterator is finalized
                # soon after, and that closes the connection
                lines = response.aiter_lines()
                assert (await anext(lines)).startswith("data: ")
                fake.process.send_signal(signal.SIGTERM)
                await fake.wait_for_stderr("cleaning up before exit...")  # 1st handled
                fake.process.send_signal(signal.SIGTERM)
                assert await fake.process.wait() == 1, fake.stderr_text
            await fake.wait_for_stderr("Received second interrupt, terminating immediately.")


async def test_help_lists_real_and_fake_flags_and_version_exits_0(
        fake_server_cmd: list[str]) -> None:
    with trio.fail_after(DEADLINE_S):
        helped = await trio.run_process([*fake_server_cmd, "--help"], capture_stdout=True,
                                        stdin=subprocess.DEVNULL)
        version = await trio.run_process([*fake_server_cmd, "--version"], capture_stderr=True,
                                         stdin=subprocess.DEVNULL)
    text = helped.stdout.decode()
    for option in ("-c, --ctx-size", "--jinja, --no-jinja", "-fa, --flash-attn",
                   "--fake-crash-mid-stream K"):
        assert re.search(rf"^{re.escape(option)}\s{{2,}}", text, re.MULTILINE), option
    assert "--no-mmap" not in text  # rejected by this llama-server build, so not listed
    assert version.stderr.startswith(b"version: ")


async def test_the_simulated_gpu_prints_buffers_and_refuses_a_load_past_its_size(
        fake_server_cmd: list[str], tmp_path: Path) -> None:
    gpu = ["--fake-gpu-file", str(tmp_path / "gpu0"), "--fake-gpu-mib", "1000"]
    async with running_fake(fake_server_cmd, "--fake-vram-mib", "600", *gpu) as first, \
            httpx.AsyncClient() as client:
        with trio.fail_after(DEADLINE_S):
            await first.wait_healthy(client)
        footprint = Footprint.parse(first.stderr_text.splitlines())
        assert footprint is not None
        assert footprint.on_gpus() == {"CUDA0": 600 * 2**20}
        # 600 + 300 fits beside it; 600 + 500 does not, and dies as llama-server does.
        async with running_fake(fake_server_cmd, "--fake-vram-mib", "300", *gpu) as second:
            with trio.fail_after(DEADLINE_S):
                await second.wait_healthy(client)
            async with running_fake(fake_server_cmd, "--fake-vram-mib", "500", *gpu) as third:
                with trio.fail_after(DEADLINE_S):
                    await third.process.wait()
                    await third.wait_for_stderr("failed to load model")
                assert third.process.returncode == 1
                assert "CUDA error: out of memory" in third.stderr_text
                assert "failed to load model" in third.stderr_text
                assert diagnose(third.stderr_text.splitlines()).startswith(" (not enough")
