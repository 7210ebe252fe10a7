"""Ollama's native API (``/api/chat``, ``/api/generate``, ``/api/embed``,
``/api/embeddings``) through swapd, with the real ``ollama`` Python client.

swapd runs in-process with fake llama-server children (``fake_llama_server.py``); the
client runs in a worker thread. The fake answers in the real server's shapes (timings
on the last chunk, ``/infill``'s own shape), checked against the real binary in
``test_real_swapd.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama
import pytest
import trio

from swapd.config import parse_config
from swapd.http.ollama import OllamaError, parse_keep_alive, translate
from swapd.http.progress import PREFIX
from swapd.serve import Running, open_server
from tests.support.fake_config import fake_config

T = TypeVar("T")
WAIT = 20.0
"""Real seconds a check may wait for swapd (a deadline, never a measurement)."""


def config_text(tmp_path: Path, **extra: Any) -> str:
    return fake_config(tmp_path, {
        "chat-a": {"model": "a.gguf", "aliases": ["a"],
                   "flags": {"ctx-size": 4096, "jinja": True, "fake-load-ms": 300}},
        "chat-b": {"model": "b.gguf",
                   "flags": {"ctx-size": 4096, "jinja": True, "fake-load-ms": 300}},
        "embed": {"model": "e.gguf", "flags": {"ctx-size": 512, "embedding": True}},
    }, **extra)


@asynccontextmanager
async def swapd(tmp_path: Path, **extra: Any) -> AsyncIterator[Running]:
    config = parse_config(config_text(tmp_path, **extra), base_dir=tmp_path)
    async with open_server(config) as running:
        yield running


async def in_thread(fn: Callable[[], T]) -> T:
    with trio.fail_after(WAIT):
        return await trio.to_thread.run_sync(fn)


def client(running: Running, **kw: Any) -> ollama.Client:
    return ollama.Client(host=running.url, timeout=WAIT, **kw)


USER = [{"role": "user", "content": "hello"}]


async def test_chat_answers_whole_and_streamed(tmp_path: Path) -> None:
    async with swapd(tmp_path) as running:
        c = client(running)
        whole = await in_thread(lambda: c.chat("a", messages=USER, stream=False))
        assert whole.message.role == "assistant"
        assert whole.message.content is not None
        assert whole.message.content.startswith("fake:chat-a:")
        assert whole.done and whole.done_reason == "stop" and whole.model == "a"
        assert whole.eval_count == 8 and whole.prompt_eval_count == 4
        assert whole.eval_duration == 12_000_000 and whole.prompt_eval_duration == 2_000_000
        assert whole.total_duration is not None and whole.load_duration is not None
        assert whole.total_duration >= whole.load_duration > 0  # it waited for the load

        parts = await in_thread(lambda: list(c.chat(
            "a", messages=USER, stream=True, options={"num_predict": 3, "num_ctx": 99999})))
        assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
        text = "".join(p.message.content or "" for p in parts)
        assert text.startswith("fake:chat-a:") and text.count(" token") == 2  # num_predict
        assert parts[-1].done_reason == "length" and parts[-1].eval_count == 3
        assert all(not p.message.thinking for p in parts)  # no think: no progress

        async with httpx.AsyncClient(base_url=running.url) as http:
            r = await http.post("/api/chat", json={"model": "a", "messages": USER})
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = r.text.strip().split("\n")
        assert all(json.loads(line)["model"] == "a" for line in lines)
        assert json.loads(lines[-1])["done"] is True
        assert "load_duration" in json.loads(lines[-1])


async def test_generate_chat_raw_and_fill_in_the_middle(tmp_path: Path) -> None:
    async with swapd(tmp_path) as running:
        c = client(running)
        chat = await in_thread(lambda: c.generate("a", "hi", system="be brief", stream=False))
        raw = await in_thread(lambda: c.generate("a", "hi", raw=True, stream=False))
        fim = await in_thread(lambda: c.generate("a", "def f(", suffix="\n    return x",
                                                 stream=False, options={"num_predict": 2}))
        streamed_fim = await in_thread(lambda: list(c.generate("a", "x = ", suffix="\n",
                                                               stream=True)))
        for answer in (chat, raw, fim):
            assert answer.response.startswith("fake:chat-a:") and answer.done
        assert fim.done_reason == "length" and fim.eval_count == 2
        assert "".join(p.response for p in streamed_fim).startswith("fake:chat-a:")
        assert streamed_fim[-1].done and streamed_fim[-1].eval_count == 8
    metrics = running.frontend.metrics.render().decode()
    assert 'route="/api/generate"' in metrics


async def test_embed_and_the_older_embeddings(tmp_path: Path) -> None:
    async with swapd(tmp_path) as running:
        c = client(running)
        many = await in_thread(lambda: c.embed("embed", ["one", "two"]))
        one = await in_thread(lambda: c.embed("embed", "one", dimensions=4))
        old = await in_thread(lambda: c.embeddings("embed", "one"))
        assert len(many.embeddings) == 2 and len(many.embeddings[0]) == 8
        assert many.embeddings[0] != many.embeddings[1]
        assert len(one.embeddings[0]) == 4
        assert math.isclose(sum(v * v for v in one.embeddings[0]), 1.0)
        assert len(old.embedding) == 8


async def test_tools_and_structured_output(tmp_path: Path) -> None:
    tool = {"type": "function", "function": {
        "name": "weather", "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    schema = {"type": "object", "properties": {"fake": {"type": "string"}},
              "required": ["fake"]}
    async with swapd(tmp_path) as running:
        c = client(running)
        whole = await in_thread(lambda: c.chat("a", messages=USER, tools=[tool],
                                               stream=False))
        parts = await in_thread(lambda: list(c.chat("a", messages=USER, tools=[tool], stream=True)))
        for calls in (whole.message.tool_calls,
                      [t for p in parts for t in p.message.tool_calls or ()]):
            assert calls is not None and len(calls) == 1
            assert calls[0].function.name == "weather"
            assert calls[0].function.arguments == {"fake": "chat-a"}
        # The tool's answer goes back, with the call, as Ollama's clients send it.
        history = [*USER, whole.message.model_dump(exclude_none=True),
                   {"role": "tool", "content": "sunny", "tool_name": "weather"}]
        after = await in_thread(lambda: c.chat("a", messages=history, stream=False))
        assert after.message.content is not None
        structured = await in_thread(lambda: c.chat("a", messages=USER, format=schema,
                                                    stream=False))
        assert json.loads(structured.message.content or "") == {"fake": "chat-a"}
        as_json = await in_thread(lambda: c.generate("a", "hi", format="json", stream=False))
        assert json.loads(as_json.response) == {"fake": "chat-a"}


async def test_a_waiting_stream_shows_progress_only_when_it_thinks(tmp_path: Path) -> None:
    """Through a swap: each request waits for its model's load. With ``think`` the
    progress lines are ``thinking``; without, the stream carries only the answer."""
    async with swapd(tmp_path) as running:
        c = client(running)
        thinking = await in_thread(lambda: list(c.chat("a", messages=USER, think=True,
                                                       stream=True)))
        plain = await in_thread(lambda: list(c.chat("chat-b", messages=USER, stream=True)))
        swapped = await in_thread(lambda: list(c.generate("a", "hi", think=True, stream=True)))
        thought = "".join(p.message.thinking or "" for p in thinking)
        assert thought.startswith(PREFIX) and "chat-a is ready" in thought
        assert "".join(p.message.content or "" for p in thinking).startswith("fake:chat-a:")
        assert not any(p.message.thinking for p in plain)
        assert "".join(p.message.content or "" for p in plain).startswith("fake:chat-b:")
        assert "".join(p.thinking or "" for p in swapped).startswith(PREFIX)
        assert running.supervisor.stats["swaps"] >= 2
        # The progress sent back in the next turn is stripped before the model sees it.
        back = [*USER, {"role": "assistant", "content": "x", "thinking": thought}, *USER]
        answer = await in_thread(lambda: c.chat("a", messages=back, stream=False))
        assert answer.message.content


async def wait_unloaded(running: Running, name: str) -> None:
    with trio.fail_after(WAIT):
        while running.supervisor.profile_state(name).value != "idle":
            await trio.sleep(0.05)


async def test_keep_alive(tmp_path: Path) -> None:
    async with swapd(tmp_path, ttl="10m") as running:
        c = client(running)
        sup = running.supervisor
        await in_thread(lambda: c.chat("a", messages=USER, stream=False, keep_alive=0))
        await wait_unloaded(running, "chat-a")
        await in_thread(lambda: c.chat("a", messages=USER, stream=False, keep_alive="1h30m"))
        with trio.fail_after(WAIT):
            while sup.idle_ttl("chat-a") != 5400:
                await trio.sleep(0.02)
        await in_thread(lambda: c.chat("a", messages=USER, stream=False, keep_alive=-1))
        with trio.fail_after(WAIT):
            while sup.idle_ttl("chat-a") is not None:
                await trio.sleep(0.02)
        async with httpx.AsyncClient(base_url=running.url) as http:
            ps = (await http.get("/api/ps")).json()["models"]
        assert ps[0]["expires_at"].startswith("2318")  # Ollama's "never"
        # As Ollama: a request without keep_alive goes back to the default (the ttl).
        await in_thread(lambda: c.chat("a", messages=USER, stream=False))
        with trio.fail_after(WAIT):
            while sup.idle_ttl("chat-a") != 600:
                await trio.sleep(0.02)
        # Ollama's load and unload requests: no messages.
        unloaded = await in_thread(lambda: c.chat("a", messages=[], keep_alive=0))
        assert unloaded.done_reason == "unload"
        await wait_unloaded(running, "chat-a")
        loaded = await in_thread(lambda: c.generate("chat-b", ""))
        assert loaded.done_reason == "load"
        assert sup.profile_state("chat-b").value == "ready"


async def test_errors_are_ollamas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPD_TEST_KEY", "sk-test")
    async with swapd(tmp_path, security={"api_key_env": "SWAPD_TEST_KEY"}) as running:
        c = client(running, headers={"Authorization": "Bearer sk-test"})
        with pytest.raises(ollama.ResponseError) as missing:
            await in_thread(lambda: c.chat("nope", messages=USER))
        assert missing.value.status_code == 404
        assert missing.value.error == 'model "nope" not found, try pulling it first'
        with pytest.raises(ollama.ResponseError) as bad:
            await in_thread(lambda: c.chat("a", messages=USER, keep_alive="soon"))
        assert bad.value.status_code == 400 and "keep_alive" in bad.value.error
        with pytest.raises(ollama.ResponseError) as unauthorized:
            await in_thread(lambda: client(running).chat("a", messages=USER))
        assert unauthorized.value.status_code == 401
        assert unauthorized.value.error.startswith("missing or invalid API key")
        headers = {"Authorization": "Bearer sk-test"}
        async with httpx.AsyncClient(base_url=running.url, headers=headers) as http:
            checks = [
                (await http.post("/api/chat", content=b"{not json"), 400),
                (await http.post("/api/chat", json=[1]), 400),
                (await http.post("/api/chat", json={"messages": USER}), 400),
                (await http.post("/api/chat", json={"model": "a", "messages": "hi"}), 400),
                (await http.post("/api/chat", json={"model": "a", "messages": USER,
                                                    "format": "yaml"}), 400),
                (await http.post("/api/embed", json={"model": "embed", "input": [1]}), 400),
                (await http.get("/api/chat"), 405),
                (await http.post("/api/pull", json={"model": "a"}), 404),
                (await http.get("/api/nothing"), 404),
                (await http.post("/api/show", json={"model": 5}), 400),
            ]
        for response, status in checks:
            assert response.status_code == status, response.text
            body = response.json()
            assert set(body) == {"error"} and isinstance(body["error"], str), body


def test_translation_edges() -> None:
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("-1") == math.inf and parse_keep_alive(-1) == math.inf
    assert parse_keep_alive(0) == 0 and parse_keep_alive("250ms") == 0.25
    assert parse_keep_alive(None) is None
    for junk in ("5 minutes", "m", True, [], "nan"):
        with pytest.raises(OllamaError):
            parse_keep_alive(junk)
    call = translate("/api/chat", {"model": "m", "messages": [
        {"role": "user", "content": "look", "images": ["iVBORw0KGgo="]}],
        "options": {"temperature": 0.1, "num_predict": -1, "seed": 3, "stop": ["x"]}})
    assert call.stream and call.body["stream_options"] == {"include_usage": True}
    assert call.body["temperature"] == 0.1 and "max_tokens" not in call.body
    assert call.body["messages"][0]["content"][1]["image_url"]["url"].startswith(
        "data:image/png;base64,")
    assert translate("/api/chat", {"model": "m", "messages": [], "think": "high"}
                     ).body["reasoning_effort"] == "high"
    fim = translate("/api/generate", {"model": "m", "prompt": "a", "suffix": "b",
                                      "stream": False})
    assert fim.path == "/infill" and fim.body["input_suffix"] == "b"


async def test_open_webui_ollama_connection(tmp_path: Path) -> None:
    """Open WebUI's Ollama connection, request by request.

    Reconstructed from open-webui/open-webui ``backend/open_webui/routers/ollama.py``
    (``verify_connection``: GET ``{url}/api/version``; ``get_all_models``: GET
    ``/api/tags`` then ``get_ollama_loaded_models``: GET ``/api/ps``;
    ``generate_chat_completion``: POST ``/api/chat`` with the model name given
    ``:latest`` when it has no tag, the body from ``utils/payload.py``
    ``convert_payload_openai_to_ollama``: model, messages (images as bare base64),
    stream, options; its title generation is the same route with ``stream: false``;
    ``embed``: POST ``/api/embed`` {model, input: [...]}; ``unload_model``: POST
    ``/api/generate`` {model, keep_alive: 0, prompt: ""}) and its chat with
    ``keep_alive`` 0 (a model's "keep_alive" param, lifted from options).
    """
    async with swapd(tmp_path) as running, httpx.AsyncClient(
            base_url=running.url, timeout=WAIT) as http:
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/api/version")).json()["version"]
        names = [m["model"] for m in (await http.get("/api/tags")).json()["models"]]
        assert "chat-a" in names
        assert (await http.get("/api/ps")).json() == {"models": []}
        chat = {"model": "chat-a:latest", "stream": True, "options": {"temperature": 0.7},
                "messages": [{"role": "system", "content": "You are helpful."},
                             {"role": "user", "content": "Why is the sky blue?"}]}
        async with http.stream("POST", "/api/chat", json=chat) as r:
            assert r.headers["content-type"] == "application/x-ndjson"
            lines = [json.loads(line) async for line in r.aiter_lines() if line]
        assert lines[-1]["done"] is True
        assert "".join(x["message"]["content"] for x in lines).startswith("fake:chat-a:")
        title = {"model": "chat-a:latest", "stream": False,
                 "messages": [{"role": "user", "content": "### Task:\nGenerate a concise, "
                               "3-5 word title with an emoji summarizing the chat history."}]}
        answer = (await http.post("/api/chat", json=title)).json()
        assert answer["done"] is True and answer["message"]["content"]
        embedded = (await http.post("/api/embed", json={"model": "embed:latest",
                                                        "input": ["a chunk"]})).json()
        assert len(embedded["embeddings"]) == 1
        ps = (await http.get("/api/ps")).json()["models"]
        assert "embed" in {m["name"] for m in ps}
        last = {**chat, "stream": False, "keep_alive": 0}
        assert (await http.post("/api/chat", json=last)).json()["done"] is True
        await wait_unloaded(running, "chat-a")
        unload = {"model": "embed:latest", "keep_alive": 0, "prompt": ""}
        assert (await http.post("/api/generate", json=unload)).json()["done_reason"] == (
            "unload")
        await wait_unloaded(running, "embed")


@pytest.mark.real_llama
async def test_chat_generate_and_embed_through_swaps_with_the_real_server(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path) -> None:
    """The real llama-server: Ollama's streamed chat, generate (chat, raw and
    fill-in-the-middle) and embed, each waiting for a swap, with the timings filled."""
    config = parse_config(json.dumps({
        "listen": "127.0.0.1:0", "state_dir": str(tmp_path / "state"),
        "llama_server": {"command": str(llama_server_bin)},
        "timeouts": {"start": "60s", "stop": "10s"},
        "profiles": {
            "tiny-a": {"model": str(tiny_models / "a.gguf"),
                       "flags": {"ctx-size": 1024, "threads": 1, "jinja": True}},
            "tiny-b": {"model": str(tiny_models / "b.gguf"),
                       "flags": {"ctx-size": 1024, "threads": 1, "embedding": True,
                                 "pooling": "mean"}},
        },
    }))
    async with open_server(config) as running:
        c = ollama.Client(host=running.url, timeout=60)
        options = {"num_predict": 4, "temperature": 0, "seed": 1}

        def run(fn: Callable[[], T]) -> Any:
            return trio.to_thread.run_sync(fn)

        with trio.fail_after(120):
            parts = await run(lambda: list(c.chat("tiny-a", messages=USER, stream=True,
                                                  think=True, options=options)))
            embedded = await run(lambda: c.embed("tiny-b", ["one", "two"]))
            generated = await run(lambda: list(c.generate("tiny-a", "hello", stream=True,
                                                          options=options)))
            raw = await run(lambda: c.generate("tiny-a", "hello", raw=True, stream=False,
                                               options=options))
            with pytest.raises(ollama.ResponseError) as no_fim:
                await run(lambda: c.generate("tiny-a", "def f(", suffix="):\n",
                                             stream=False, options=options))
        assert "".join(p.message.thinking or "" for p in parts).startswith(PREFIX)
        last = parts[-1]
        assert last.done and last.done_reason == "length" and last.eval_count == 4
        assert last.prompt_eval_count and last.prompt_eval_duration and last.eval_duration
        assert last.load_duration and last.load_duration > 0
        assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) > 0
        assert math.isclose(sum(v * v for v in embedded.embeddings[0]), 1.0, rel_tol=1e-3)
        assert generated[-1].done and generated[-1].eval_count == 4
        assert raw.done and raw.eval_count == 4
        # The tiny model has no FIM tokens: llama-server's own refusal, in Ollama's shape.
        assert no_fim.value.status_code == 501 and "Infill is not supported" in (
            no_fim.value.error)
        assert running.supervisor.stats["swaps"] >= 2


def test_junk_that_used_to_escape_the_translation() -> None:
    """An integer keep_alive past any float ended the connection with no answer
    (OverflowError); messages given as an object were taken for none."""
    from swapd.http.ollama import OllamaError, parse_keep_alive, translate

    assert parse_keep_alive(10**400) == math.inf
    for messages in ({}, "", 0):
        with pytest.raises(OllamaError) as refused:
            translate("/api/chat", {"model": "a", "messages": messages})
        assert refused.value.status == 400


def test_upstream_events_in_any_line_ending_and_bounded() -> None:
    """A fallback may end SSE lines in CRLF, and its last event may lack the blank line
    (flushed at the end); an event that never ends is an upstream error, not a buffer
    that grows for the whole answer."""
    from swapd.http.ollama import MAX_EVENT, sse_events
    from swapd.net.upstream import UpstreamError

    buffer = bytearray()
    assert list(sse_events(buffer, b'data: {"a":1}\r\n\r\ndata: 2\r\n')) == [b'{"a":1}']
    assert list(sse_events(buffer, b"\n\n")) == [b"2"]
    with pytest.raises(UpstreamError):
        list(sse_events(bytearray(), b"data: " + b"x" * MAX_EVENT))
