"""The HTTP surface end to end: swapd in-process, fake llama-server children, real clients.

Each test runs swapd on a free loopback port with profiles whose children are the fake
llama-server (real processes, so swaps are real spawns and real SIGTERMs). Timings here
are deadlines only.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import ollama
import openai
import pytest
import trio
import trio.testing

from swapd.config import parse_config
from swapd.http.progress import PREFIX
from swapd.http.progress import line as progress_line
from swapd.serve import Running, open_server
from tests.support.fake_config import fake_config
from tests.support.rawhttp import exchange, request_bytes


def config_text(tmp_path: Path, *, queue: dict[str, Any] | None = None,
                timeouts: dict[str, Any] | None = None, a_flags: dict[str, Any] | None = None,
                b_flags: dict[str, Any] | None = None, **extra: Any) -> str:
    """Profiles ``a`` and ``b`` on the fake llama-server."""
    return fake_config(tmp_path, {
        "a": {"model": str(tmp_path / "a.gguf"), "aliases": ["alpha"],
              "display_name": "Model A",
              "flags": {"ctx-size": 8192, "fake-load-ms": 200, **(a_flags or {})}},
        "b": {"model": str(tmp_path / "b.gguf"),
              "flags": {"ctx-size": 4096, "fake-load-ms": 300, "jinja": True,
                        **(b_flags or {})}},
    }, timeouts={"start": "20s", "stop": "5s", **(timeouts or {})},
        queue={"max_waiting": 10, **(queue or {})}, **extra)


@asynccontextmanager
async def swapd(tmp_path: Path, **kwargs: Any) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    config = parse_config(config_text(tmp_path, **kwargs), base_dir=tmp_path)
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=30) as client:
        yield running, client


def chat(model: str | None, *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "stream": stream,
                            **extra}
    if model is not None:
        body["model"] = model
    return body


def sse_events(text: str) -> tuple[list[str], list[Any]]:
    """Split an SSE body into comments and decoded data payloads (``[DONE]`` kept)."""
    comments, data = [], []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: "):
                raw = line[len("data: "):]
                data.append(raw if raw == "[DONE]" else json.loads(raw))
            elif line:
                raise AssertionError(f"unexpected SSE line {line!r}")
    return comments, data


def delta_text(data: list[Any], key: str) -> str:
    """The text of one delta field across a stream's chunks (``content``, ``reasoning_content``)."""
    return "".join(d["choices"][0]["delta"].get(key) or "" for d in data
                   if isinstance(d, dict) and d.get("choices"))


async def test_requests_swap_models_on_demand(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, client):
        first = await client.post("/v1/chat/completions", json=chat("alpha"))
        assert first.status_code == 200
        text_a = first.json()["choices"][0]["message"]["content"]
        assert text_a.startswith("fake:a:")
        pid_a = running.supervisor.proc.pid  # type: ignore[union-attr]
        second = await client.post("/v1/chat/completions", json=chat("b"))
        assert second.status_code == 200
        assert second.json()["choices"][0]["message"]["content"].startswith("fake:b:")
        assert running.supervisor.proc.pid != pid_a  # type: ignore[union-attr]
        # no model named: the active one answers
        third = await client.post("/v1/completions", json={"prompt": "x"})
        assert third.status_code == 200
        assert running.supervisor.stats["swaps"] == 1


async def test_streaming_request_sees_progress_then_the_answer(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (_running, client):
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("b", stream=True)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            chunks = response.aiter_raw()
            first = await chunks.__anext__()
            assert first.startswith(b": swapd loading b")
            rest = first + b"".join([c async for c in chunks])
        _comments, data = sse_events(rest.decode())
        assert data[-1] == "[DONE]"
        chunks = data[:-1]
        for chunk in chunks:  # every data line is a complete chunk with choices
            assert chunk["object"] == "chat.completion.chunk"
            assert {"id", "created", "model", "choices"} <= chunk.keys()
            assert chunk["choices"][0]["index"] == 0
        progress = [c for c in chunks if "reasoning_content" in c["choices"][0]["delta"]]
        assert progress, "no progress chunk"
        for chunk in progress:
            delta = chunk["choices"][0]["delta"]
            assert delta["reasoning_content"].startswith(PREFIX)
            assert "content" not in delta
            assert chunk["choices"][0]["finish_reason"] is None
        answer = delta_text(chunks, "content")
        assert answer.startswith("fake:b:")


async def test_openai_sdk_streams_and_waits_through_a_swap(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, _client):
        sdk = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)

        def streamed(model: str) -> tuple[str, str]:
            reasoning, content = "", ""
            for chunk in sdk.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], stream=True):
                delta = chunk.choices[0].delta
                reasoning += getattr(delta, "reasoning_content", None) or ""
                content += delta.content or ""
            return reasoning, content

        reasoning, content = await trio.to_thread.run_sync(streamed, "a")
        assert "loading a" in reasoning and reasoning.startswith(PREFIX)
        assert content.startswith("fake:a:")
        reasoning, content = await trio.to_thread.run_sync(streamed, "b")
        assert "b" in reasoning
        assert content.startswith("fake:b:")
        completion = await trio.to_thread.run_sync(lambda: sdk.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hi"}]))
        assert completion.choices[0].message.content.startswith("fake:a:")
        models = await trio.to_thread.run_sync(lambda: sdk.models.list())
        assert [m.id for m in models.data] == ["a", "b"]


async def test_ollama_client_lists_and_shows(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, _client):
        client = ollama.Client(host=running.url)
        listed = await trio.to_thread.run_sync(client.list)
        assert [m.model for m in listed.models] == ["a", "b"]
        shown = await trio.to_thread.run_sync(lambda: client.show("alpha"))
        assert shown.parameters == "num_ctx 8192"
        assert shown.modelinfo is not None
        assert shown.modelinfo["llama.context_length"] == 8192
        shown_b = await trio.to_thread.run_sync(lambda: client.show("b:latest"))
        assert "tools" in (shown_b.capabilities or [])
        assert running.supervisor.state.value == "idle"  # nothing was loaded


async def test_probes_never_load_swap_or_unload(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, client):
        probes = ["/v1/models", "/models", "/v1/models/alpha", "/api/tags",
                  "/api/show?model=b", "/api/ps", "/api/version", "/api/v1/models",
                  "/props", "/props?model=b", "/v1/props?model=a", "/version", "/v1",
                  "/health", "/swapd/status"]
        for path in probes:
            response = await client.get(path)
            assert response.status_code == 200, path
        assert (await client.post("/api/show", json={"name": "a"})).status_code == 200
        assert running.supervisor.state.value == "idle"
        assert running.supervisor.proc is None

        await client.post("/v1/chat/completions", json=chat("a"))
        pid = running.supervisor.proc.pid  # type: ignore[union-attr]
        for path in probes:
            assert (await client.get(path)).status_code == 200, path
        assert running.supervisor.proc.pid == pid  # type: ignore[union-attr]
        assert running.supervisor.active.name == "a"  # type: ignore[union-attr]

        models = (await client.get("/v1/models")).json()["data"]
        by_id = {m["id"]: m for m in models}
        assert by_id["a"]["context_length"] == by_id["a"]["max_model_len"] == 8192
        assert by_id["a"]["status"] == {"value": "loaded"}
        assert by_id["b"]["status"] == {"value": "unloaded"}
        live = (await client.get("/props")).json()  # the running child's own /props
        assert live["default_generation_settings"]["n_ctx"] == 8192
        synthesized = (await client.get("/props?model=b")).json()
        assert synthesized["default_generation_settings"]["n_ctx"] == 4096
        assert synthesized["model_alias"] == "b"
        empty = (await client.post("/api/show", json={"model": ""})).json()
        assert empty["parameters"] == "num_ctx 8192"  # empty name: the active profile
        lm = (await client.get("/api/v1/models")).json()["models"]
        assert lm[0]["loaded_instances"][0]["config"]["context_length"] == 8192
        assert lm[1]["loaded_instances"] == [] and lm[1]["max_context_length"] == 4096


async def test_request_errors_are_openai_shaped(tmp_path: Path) -> None:
    async with swapd(tmp_path, security={"max_body": "2KiB"}) as (running, client):
        bad = await client.post("/v1/chat/completions", content=b"{not json")
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "invalid_json"
        unknown = await client.post("/v1/chat/completions", json=chat("nope"))
        assert unknown.status_code == 404
        assert "available: a, alpha, b" in unknown.json()["error"]["message"]
        none = await client.post("/v1/chat/completions", json=chat(None))
        assert none.status_code == 400
        assert "names no 'model'" in none.json()["error"]["message"]
        big = await client.post("/v1/chat/completions", json=chat("a", pad="x" * 4000))
        assert big.status_code == 413
        assert set(big.json()["error"]) == {"message", "type", "code"}
        assert running.supervisor.proc is None  # none of these loaded anything


async def test_queue_full_gives_429_with_retry_after(tmp_path: Path) -> None:
    async with swapd(tmp_path, queue={"max_waiting": 1},
                     a_flags={"fake-never-healthy": True}) as (_running, client), \
            trio.open_nursery() as nursery:
        nursery.start_soon(partial(client.post, "/v1/chat/completions", json=chat("a")))
        with trio.fail_after(10):
            while _running.supervisor.n_waiting < 1:
                await trio.sleep(0.01)
        full = await client.post("/v1/chat/completions", json=chat("b"))
        assert full.status_code == 429
        assert int(full.headers["retry-after"]) >= 1
        # A streaming chat too: refused before its early 200, with the status and
        # Retry-After, not a 200 and an in-band error.
        async with client.stream("POST", "/v1/chat/completions",
                                  json=chat("b", stream=True)) as streamed:
            assert streamed.status_code == 429
            assert int(streamed.headers["retry-after"]) >= 1
            assert streamed.headers["content-type"] == "application/json"
        nursery.cancel_scope.cancel()


async def test_queue_wait_gives_504_naming_the_model(tmp_path: Path) -> None:
    async with swapd(tmp_path, timeouts={"queue_wait": "500ms"},
                     a_flags={"fake-never-healthy": True}) as (running, client):
        slow = await client.post("/v1/chat/completions", json=chat("a"))
        assert slow.status_code == 504
        assert "'a' was not ready within 0.5s" in slow.json()["error"]["message"]
        assert running.supervisor.state.value == "starting"  # the load goes on


async def test_failed_start_is_503_with_exit_code_and_stderr(tmp_path: Path) -> None:
    flags = {"fake-exit-at-start": 1, "fake-stderr": "error: invalid argument: --bogus"}
    async with swapd(tmp_path, b_flags=flags) as (_running, client):
        failed = await client.post("/v1/chat/completions", json=chat("b"))
        assert failed.status_code == 503
        message = failed.json()["error"]["message"]
        assert "exited with code 1" in message and "invalid argument: --bogus" in message
        status = (await client.get("/swapd/status")).json()
        assert status["last_error"]["exit_code"] == 1
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("b", stream=True)) as response:
            body = (await response.aread()).decode()
        _comments, data = sse_events(body)
        assert data[-1] == "[DONE]"
        assert "invalid argument: --bogus" in data[-2]["error"]["message"]


async def test_crash_mid_request_is_502_or_in_band(tmp_path: Path) -> None:
    async with swapd(tmp_path, a_flags={"fake-crash-after": 1}) as (_running, client):
        crashed = await client.post("/v1/chat/completions", json=chat("a"))
        assert crashed.status_code == 502
        message = crashed.json()["error"]["message"]
        # Whichever is seen first: the broken connection, or the reaped child.
        assert ("model 'a' did not answer" in message
                or "model 'a' exited with code 3 while serving" in message), message
    async with swapd(tmp_path, a_flags={"fake-crash-mid-stream": 2}) as (_running, client):
        await client.post("/swapd/load", json={"model": "a"})
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("a", stream=True)) as response:
            assert response.status_code == 200
            body = (await response.aread()).decode()
        _comments, data = sse_events(body)
        assert data[-1] == "[DONE]"
        assert data[-2]["error"]["code"] == "model_failed"


async def test_client_leaving_the_queue_does_not_cancel_the_load(tmp_path: Path) -> None:
    async with swapd(tmp_path, a_flags={"fake-load-ms": 1500}) as (running, client):
        with trio.move_on_after(0.5):
            await client.post("/v1/chat/completions", json=chat("a"))
        with trio.fail_after(5):
            while running.supervisor.n_waiting:
                await trio.sleep(0.01)
        assert running.supervisor.state.value == "starting"
        with trio.fail_after(20):
            while running.supervisor.state.value != "ready":
                await trio.sleep(0.02)
        assert running.supervisor.n_inflight == 0


async def test_a_client_leaving_as_load_progress_streams_does_not_stop_swapd(
        tmp_path: Path) -> None:
    """The progress task's failed send reaches the connection as an exception group:
    it must end that connection only, not the server."""
    async with swapd(tmp_path) as (running, client):
        port = int(running.url.rsplit(":", 1)[1])
        for model in ("a", "b", "a"):  # a load, then swaps: each streams progress
            answer = await exchange(port, request_bytes(  # the head, then it leaves
                "POST", "/v1/chat/completions", body=json.dumps(chat(model, stream=True)
                                                                ).encode()))
            assert answer.streamed
        with trio.fail_after(20):
            while running.supervisor.state.value != "ready":
                await trio.sleep(0.02)
        assert (await client.get("/health")).status_code == 200


async def test_progress_lines_are_stripped_from_returning_messages(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (_running, client):
        messages = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello",
             "reasoning_content": progress_line("loading a: 50%") + "real thought"},
            {"role": "assistant", "content": "again", "reasoning": progress_line("queued")},
        ]
        echoed = await client.post("/v1/echo", json={"model": "a", "messages": messages})
        assert echoed.status_code == 200
        sent = echoed.json()
        sent = sent.get("body", sent)
        assert sent["messages"][1]["reasoning_content"] == "real thought"
        assert sent["messages"][2]["reasoning"] == ""  # the key stays: some APIs need it


async def test_operations_load_unload_and_status(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, client):
        loaded = await client.post("/swapd/load", json={"model": "alpha"})
        assert loaded.status_code == 200 and loaded.json()["model"] == "a"
        status = (await client.get("/swapd/status")).json()
        assert status["state"] == "ready" and status["active"] == "a"
        assert status["pid"] == running.supervisor.proc.pid  # type: ignore[union-attr]
        logs = await client.get("/swapd/logs")
        assert "model loaded" in logs.text
        unloaded = await client.post("/swapd/unload")
        assert unloaded.json()["state"] == "idle"
        assert running.supervisor.proc is None
        missing = await client.post("/swapd/load", json={})
        assert missing.status_code == 400


async def test_a_profile_that_cannot_start_does_not_stop_the_running_model(
        tmp_path: Path) -> None:
    (tmp_path / "notes.gguf").write_text("not a model\n")
    async with swapd(tmp_path) as (running, client):
        pid = (await client.post("/swapd/load", json={"model": "a"})).json()["pid"]
        profiles = running.supervisor.config.profiles
        for broken, why in (
                ({"model": str(tmp_path / "gone.gguf")}, "gone.gguf: No such file"),
                ({"model": str(tmp_path / "notes.gguf")}, "notes.gguf is not a GGUF file"),
                ({"flags": {"no-such-flag": True}},
                 "llama-server does not accept --no-such-flag")):
            config = attrs.evolve(running.supervisor.config, profiles={
                **profiles, "b": attrs.evolve(profiles["b"], **broken)})
            await running.supervisor.reload(config)
            answer = await client.post("/v1/chat/completions", json=chat("b"))
            assert answer.status_code == 503
            message = answer.json()["error"]["message"]
            assert message.startswith("profile 'b': not started: ") and why in message, message
            async with client.stream("POST", "/v1/chat/completions",
                                     json=chat("b", stream=True)) as response:
                body = (await response.aread()).decode()
            _comments, data = sse_events(body)  # a waiting stream hears it in band
            assert why in data[-2]["error"]["message"] and data[-1] == "[DONE]"
            assert running.supervisor.proc.pid == pid  # type: ignore[union-attr]
            served = await client.post("/v1/chat/completions", json=chat("a"))
            assert served.json()["choices"][0]["message"]["content"].startswith(f"fake:a:{pid}")
        assert running.supervisor.stats["swaps"] == 0


async def test_unload_after_a_crash_leaves_the_failed_state(tmp_path: Path) -> None:
    async with swapd(tmp_path, a_flags={"fake-crash-after": 1}) as (running, client):
        crashed = await client.post("/v1/chat/completions", json=chat("a"))
        assert crashed.status_code == 502
        with trio.fail_after(10):  # the crash may be answered before it is reaped
            while running.supervisor.state.value != "failed":
                await trio.sleep(0.01)
        unloaded = await client.post("/swapd/unload")
        assert unloaded.status_code == 200
        assert unloaded.json() == {"status": "unloaded", "state": "idle"}


async def test_unload_that_did_not_finish_is_504_naming_what_still_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with swapd(tmp_path) as (running, client):
        pid = (await client.post("/swapd/load", json={"model": "a"})).json()["pid"]

        async def unload_in_vain() -> bool:
            return False  # what Supervisor.unload says when its deadline passed

        monkeypatch.setattr(running.supervisor, "unload", unload_in_vain)
        answer = await client.post("/swapd/unload")
        assert answer.status_code == 504
        error = answer.json()["error"]
        assert (error["type"], error["code"]) == ("timeout_error", "unload_timeout")
        assert f"still running: a (pid {pid}, state ready, 0 request(s) in flight)" in (
            error["message"])


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/responses", "/v1/rerank"])
async def test_any_v1_post_with_a_model_is_routed(tmp_path: Path, path: str) -> None:
    async with swapd(tmp_path) as (_running, client):
        response = await client.post(path, json={"model": "b", "input": "x"})
        assert response.status_code == 200
        assert response.headers.get("x-fake-pid")


async def test_metrics_count_requests_swaps_and_live_state(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (_running, client):
        await client.post("/v1/chat/completions", json=chat("a"))
        await client.post("/v1/chat/completions", json=chat("b"))
        await client.post("/v1/chat/completions", json=chat("nope"))
        await client.post("/v1/whatever", json={"model": "b"})
        text = (await client.get("/metrics")).text
    lines = set(text.splitlines())
    assert 'swapd_requests_total{model="a",route="/v1/chat/completions",status="200"} 1.0' \
        in lines
    assert 'swapd_requests_total{model="(unknown)",route="/v1/chat/completions",' \
        'status="404"} 1.0' in lines
    assert 'swapd_requests_total{model="b",route="/v1/(other)",status="200"} 1.0' in lines
    assert 'swapd_swaps_total{result="ok"} 1.0' in lines
    assert 'swapd_state{state="ready"} 1.0' in lines
    assert 'swapd_active_profile{profile="b"} 1.0' in lines
    assert 'swapd_load_duration_seconds_count{profile="a"} 1.0' in lines
    assert any(line.startswith('swapd_time_to_first_byte_seconds_count{model="b"}')
               for line in lines)
    assert "swapd_cache_restores_total 0.0" in lines


async def test_reload_by_diff_keeps_the_running_model(tmp_path: Path) -> None:
    path = tmp_path / "swapd.yaml"
    path.write_text(config_text(tmp_path))
    config = parse_config(path.read_text(), base_dir=tmp_path)
    async with open_server(config, config_path=path) as running, httpx.AsyncClient(
            base_url=running.url, timeout=30) as client:
        await client.post("/swapd/load", json={"model": "a"})
        pid = running.supervisor.proc.pid  # type: ignore[union-attr]
        text = json.loads(path.read_text())
        text["profiles"]["c"] = {"model": "c.gguf", "flags": {"ctx-size": 2048}}
        text["profiles"]["b"]["flags"]["ctx-size"] = 1024
        path.write_text(json.dumps(text))
        result = await client.post("/swapd/reload")
        assert result.status_code == 200
        assert result.json()["active_kept"] is True and result.json()["added"] == ["c"]
        assert running.supervisor.proc.pid == pid  # type: ignore[union-attr]
        models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        assert models["c"]["context_length"] == 2048 and models["b"]["context_length"] == 1024
        answer = await client.post("/v1/chat/completions", json=chat("a"))
        assert answer.json()["choices"][0]["message"]["content"].startswith("fake:a:")

        path.write_text("profiles:\n  a: {model: a.gguf, flag: {}}\n")  # a typo
        rejected = await client.post("/swapd/reload")
        assert rejected.status_code == 400
        assert "did you mean 'flags'" in rejected.json()["error"]["message"]
        models = {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
        assert models == {"a", "b", "c"}  # the old config stays


@asynccontextmanager
async def reloadable_swapd(tmp_path: Path, **kwargs: Any) -> AsyncIterator[
        tuple[Running, httpx.AsyncClient, Path]]:
    path = tmp_path / "swapd.yaml"
    path.write_text(config_text(tmp_path, **kwargs))
    config = parse_config(path.read_text(), base_dir=tmp_path)
    async with open_server(config, config_path=path) as running, httpx.AsyncClient(
            base_url=running.url, timeout=30) as client:
        yield running, client, path


def without_profile(path: Path, name: str) -> None:
    config = json.loads(path.read_text())
    del config["profiles"][name]
    path.write_text(json.dumps(config))


async def test_a_profile_removed_while_it_loads_is_stopped(tmp_path: Path) -> None:
    async with reloadable_swapd(tmp_path, a_flags={"fake-load-ms": 1500}) as (
            running, client, path), trio.open_nursery() as nursery:
        answers: list[httpx.Response] = []

        async def load_a() -> None:
            answers.append(await client.post("/swapd/load", json={"model": "a"}))

        nursery.start_soon(load_a)
        with trio.fail_after(10):
            while running.supervisor.proc is None and not running.supervisor.n_waiting:
                await trio.sleep(0.01)
        without_profile(path, "a")
        assert (await client.post("/swapd/reload")).json()["removed"] == ["a"]
        with trio.fail_after(10):
            while not answers or running.supervisor.state.value != "idle":
                await trio.sleep(0.05)
        assert answers[0].status_code == 404  # the load it waited for: gone
        assert running.supervisor.proc is None  # stopped, not left loaded and hidden
        ps = await client.get("/api/ps")
        assert ps.status_code == 200 and ps.json() == {"models": []}
        nameless = await client.post("/v1/completions", json={"prompt": "x"})
        assert nameless.status_code == 400  # nothing loaded serves model-less requests


async def test_probes_survive_a_reload_that_removes_the_running_model(
        tmp_path: Path) -> None:
    flags = {"fake-tokens": 10000, "fake-token-delay-ms": 5}
    async with reloadable_swapd(tmp_path, a_flags=flags) as (running, client, path), \
            client.stream("POST", "/v1/chat/completions", json=chat("a", stream=True)) as stream:
        chunks = stream.aiter_raw()  # kept: a dropped iterator closes the stream
        while b"fake:a:" not in await chunks.__anext__():
            pass  # progress, until a is ready and holds this request
        without_profile(path, "a")
        assert (await client.post("/swapd/reload")).status_code == 200
        assert running.supervisor.state.value == "ready"  # until its request ends
        for probe in ("/api/ps", "/v1/models", "/swapd/status", "/props", "/api/tags",
                      "/api/v1/models", "/v1", "/health", "/metrics"):
            answer = await client.get(probe)
            assert answer.status_code == 200, (probe, answer.text)
        assert (await client.get("/api/ps")).json() == {"models": []}
        nameless = await client.post("/v1/completions", json={"prompt": "x"})
        assert nameless.status_code == 404  # not served by a model that is going away


async def test_fixed_port_in_use_is_refused_before_spawning(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = json.loads(config_text(tmp_path))
        config["llama_server"]["port"] = port
        async with open_server(parse_config(json.dumps(config))) as running, \
                httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            answer = await client.post("/v1/chat/completions", json=chat("a"))
            assert answer.status_code == 503
            message = answer.json()["error"]["message"]
            assert f"port {port} on 127.0.0.1 is in use by pid {os.getpid()} (" in message
            assert running.supervisor.proc is None


async def test_client_leaving_mid_stream_closes_its_upstream(tmp_path: Path) -> None:
    async with swapd(tmp_path, a_flags={"fake-tokens": 10000,
                                        "fake-token-delay-ms": 5}) as (running, client):
        await client.post("/swapd/load", json={"model": "a"})
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("a", stream=True)) as response:
            async for _chunk in response.aiter_raw():
                assert running.supervisor.n_inflight == 1
                break  # leave after the first chunk of a ~50 s answer
        with trio.fail_after(5):
            while running.supervisor.n_inflight:
                await trio.sleep(0.01)
        # the child is free: a new request is answered at once
        answer = await client.post("/v1/completions", json={"model": "a", "prompt": "x",
                                                            "max_tokens": 1})
        assert answer.status_code == 200


async def test_client_leaving_a_long_plain_answer_gives_its_lease_back(
        tmp_path: Path) -> None:
    """A non-streamed answer sends nothing until it is complete (50 s here): swapd
    reads nothing from the client meanwhile, so only the connection's watcher (armed
    once the wait is long) sees the client leave; its lease must come back at once."""
    async with swapd(tmp_path, a_flags={"fake-tokens": 10000,
                                        "fake-token-delay-ms": 5}) as (running, client):
        await client.post("/swapd/load", json={"model": "a"})
        port = int(running.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(request_bytes("POST", "/v1/chat/completions", body=json.dumps(
            chat("a")).encode()).replace(b"connection: close\r\n", b""))
        with trio.fail_after(10):
            while running.supervisor.n_inflight == 0:
                await trio.sleep(0.01)
        await trio.sleep(0.1)  # well past the 2 ms after which the wait is watched
        await stream.aclose()
        with trio.fail_after(5):
            while running.supervisor.n_inflight:
                await trio.sleep(0.01)


async def test_second_load_shows_an_eta(tmp_path: Path) -> None:
    async with swapd(tmp_path, b_flags={"fake-load-ms": 1200}) as (_running, client):
        await client.post("/swapd/load", json={"model": "b"})  # learns b's load time
        await client.post("/swapd/load", json={"model": "a"})
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("b", stream=True)) as response:
            body = (await response.aread()).decode()
        _comments, data = sse_events(body)
        reasoning = delta_text(data, "reasoning_content")
        assert "% (ready in ~" in reasoning


async def test_status_page_is_served_open_and_safe(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPD_TEST_KEY", "k")
    async with swapd(tmp_path, security={"api_key_env": "SWAPD_TEST_KEY"}) as (_r, client):
        for path in ("/", "/ui/", "/ui/index.html"):
            page = await client.get(path)
            assert page.status_code == 200, path
            assert page.headers["content-type"] == "text/html; charset=utf-8"
        for path in ("/ui/nope.js", "/ui/.hidden.html"):
            assert (await client.get(path)).status_code == 404, path
        # a '..' segment, even percent-encoded, is refused before routing
        assert (await client.get("/ui/..%2Fapp.py")).status_code == 400
        assert (await client.get("/swapd/status")).status_code == 401  # data needs the key
        status = (await client.get("/swapd/status", headers={"x-api-key": "k"})).json()
        assert status["history"] == [] and status["requests"] == {}


async def test_events_replay_from_a_sequence_number(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, client):
        await client.post("/swapd/load", json={"model": "a"})
        kinds = []
        async with client.stream("GET", "/swapd/events?since=0") as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    kinds.append(event["kind"])
                    if event["kind"] == "ready":
                        break
        assert kinds[0] == "status"
        assert kinds[1:] == [e.kind for e in running.supervisor.events][:len(kinds) - 1]
        assert "starting" in kinds and "ready" in kinds
        logs = (await client.get("/swapd/logs")).text
        assert "── swapd: starting a (pid" in logs
        status = (await client.get("/swapd/status")).json()
        assert status["profiles"]["a"]["display_name"] == "Model A"


async def test_quart_errors_are_openai_shaped_and_native_paths_are_proxied(
        tmp_path: Path) -> None:
    async with swapd(tmp_path) as (_running, client):
        for method, path, status in (("GET", "/nope", 404),
                                     ("POST", "/health", 405),
                                     ("GET", "/static/x.css", 404)):
            response = await client.request(method, path)
            assert response.status_code == status, path
            assert set(response.json()["error"]) == {"message", "type", "code"}
        for path in ("/completion", "/infill", "/tokenize"):  # llama-server's own routes
            answer = await client.post(path, json={"model": "a", "prompt": "x"})
            assert answer.headers.get("x-fake-pid"), path  # the child answered it
        completion = await client.post("/completion", json={"model": "a", "prompt": "x"})
        assert completion.status_code == 200
        ps = (await client.get("/api/ps")).json()["models"]
        assert ps[0]["expires_at"].startswith("2318-")  # ttl 0: it never unloads
        unknown = await client.post("/swapd/load", json={"model": "nope"})
        assert "available: a, alpha, b" in unknown.json()["error"]["message"]


async def test_an_explicit_load_waits_longer_than_queue_wait(tmp_path: Path) -> None:
    async with swapd(tmp_path, timeouts={"queue_wait": "500ms"},
                     a_flags={"fake-load-ms": 1500}) as (running, client):
        loaded = await client.post("/swapd/load", json={"model": "a"})  # 1.5 s > 0.5 s
        assert loaded.status_code == 200 and loaded.json()["model"] == "a"
        assert running.supervisor.active.name == "a"  # type: ignore[union-attr]
