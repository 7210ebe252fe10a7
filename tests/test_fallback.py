"""The fallback chain: unit tests at the HTTP boundary, then end to end through swapd.

End to end, a second fake llama-server plays the remote OpenAI-compatible upstream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from swapd.config import Fallback, parse_config
from swapd.core import process
from swapd.http.fallback import FallbackChain
from swapd.serve import open_server
from tests.test_api import chat, config_text, delta_text, sse_events
from tests.test_process import fake_argv

# -- the chain at the HTTP boundary (httpx.MockTransport) --


def fb(name: str, url: str, **kw: Any) -> Fallback:
    return Fallback(name=name, base_url=url, model=f"{name}-model", **kw)


async def test_key_comes_from_the_environment_and_model_is_rewritten(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-secret")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": []})
        return httpx.Response(200, json={"echo": json.loads(request.content)})

    chain = FallbackChain([fb("up", "https://up.example/v1", api_key_env="UPSTREAM_KEY")],
                          httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    (upstream,) = chain.fallbacks
    assert await chain.problem(upstream) is None
    assert await chain.problem(upstream) is None  # cached: one health request only
    response = await chain.open_response(upstream, "/v1/chat/completions",
                                         {"model": "local-name", "messages": []})
    await response.aread()
    health, call = seen
    assert health.url == "https://up.example/v1/models"
    assert call.url == "https://up.example/v1/chat/completions"
    assert call.headers["authorization"] == "Bearer sk-secret"
    assert json.loads(call.content)["model"] == "up-model"
    await chain.aclose()


async def test_missing_key_marks_the_upstream_unavailable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_KEY", raising=False)

    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request without a key")

    chain = FallbackChain([fb("up", "https://up.example/v1", api_key_env="NOT_SET_KEY")],
                          httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    assert await chain.problem(chain.fallbacks[0]) == "$NOT_SET_KEY is not set"
    await chain.aclose()


async def test_health_verdict_expires(autojump_clock: Any) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503 if calls == 1 else 200)

    chain = FallbackChain([fb("up", "https://up.example/v1")],
                          httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    upstream = chain.fallbacks[0]
    assert await chain.problem(upstream) == "health check answered 503"
    await trio.sleep(5)
    assert await chain.problem(upstream) == "health check answered 503"  # still cached
    await trio.sleep(20)
    assert await chain.problem(upstream) is None
    assert calls == 2
    await chain.aclose()


# -- end to end --


@asynccontextmanager
async def remote_upstream(alias: str) -> AsyncIterator[str]:
    """A fake llama-server standing in for a remote OpenAI-compatible API."""
    port = process.free_port("127.0.0.1")
    argv = fake_argv(port)
    argv[argv.index("--alias") + 1] = alias
    proc = process.spawn(alias, argv, host="127.0.0.1", port=port)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proc.watch)
        await proc.wait_ready(10, 0.02)
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            await proc.stop(5)


def with_fallbacks(tmp_path: Path, fallbacks: list[dict[str, Any]], **kwargs: Any) -> Any:
    config = json.loads(config_text(tmp_path, **kwargs))
    config["fallbacks"] = fallbacks
    return parse_config(json.dumps(config), base_dir=tmp_path)


BROKEN = {"fake-exit-at-start": 1, "fake-stderr": "CUDA error: out of memory"}


async def test_failed_start_is_served_by_the_fallback(tmp_path: Path) -> None:
    async with remote_upstream("remote") as url:
        config = with_fallbacks(tmp_path, [{"name": "lan", "base_url": url,
                                            "model": "remote"}], b_flags=BROKEN)
        async with open_server(config) as running, httpx.AsyncClient(
                base_url=running.url, timeout=30) as client:
            answer = await client.post("/v1/chat/completions", json=chat("b"))
            assert answer.status_code == 200
            assert answer.json()["choices"][0]["message"]["content"].startswith("fake:remote:")

            async with client.stream("POST", "/v1/chat/completions",
                                     json=chat("b", stream=True)) as response:
                assert response.status_code == 200
                body = (await response.aread()).decode()
            _comments, data = sse_events(body)
            assert data[-1] == "[DONE]"
            reasoning = delta_text(data, "reasoning_content")
            assert "trying the fallbacks" in reasoning
            content = delta_text(data, "content")
            assert content.startswith("fake:remote:")
            status = (await client.get("/swapd/status")).json()
            assert status["fallbacks"][0]["served"] == 2


async def test_a_fallback_can_be_named_directly(tmp_path: Path) -> None:
    async with remote_upstream("remote") as url:
        config = with_fallbacks(tmp_path, [{"name": "lan", "base_url": url,
                                            "model": "remote"}])
        async with open_server(config) as running, httpx.AsyncClient(
                base_url=running.url, timeout=30) as client:
            answer = await client.post("/v1/chat/completions", json=chat("lan"))
            assert answer.status_code == 200
            assert answer.json()["choices"][0]["message"]["content"].startswith("fake:remote:")
            assert running.supervisor.proc is None  # nothing local was started


async def test_all_down_is_503_naming_each_upstream(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MISSING_KEY", raising=False)
    closed_port = process.free_port("127.0.0.1")
    config = with_fallbacks(tmp_path, [
        {"name": "openrouter", "base_url": "http://127.0.0.1:9/v1", "model": "x",
         "api_key_env": "MISSING_KEY"},
        {"name": "lan", "base_url": f"http://127.0.0.1:{closed_port}/v1", "model": "y",
         "timeout": "2s"},
    ], b_flags=BROKEN)
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=30) as client:
        answer = await client.post("/v1/chat/completions", json=chat("b"))
        assert answer.status_code == 503
        message = answer.json()["error"]["message"]
        assert "CUDA error: out of memory" in message  # the local reason
        assert "openrouter: $MISSING_KEY is not set" in message
        assert "lan: health check failed: ConnectError" in message


async def test_open_circuit_goes_straight_to_the_fallback(tmp_path: Path) -> None:
    async with remote_upstream("remote") as url:
        config = with_fallbacks(tmp_path, [{"name": "lan", "base_url": url,
                                            "model": "remote"}], b_flags=BROKEN,
                                restart={"max_failures": 1, "cooldown": "10m"})
        async with open_server(config) as running, httpx.AsyncClient(
                base_url=running.url, timeout=30) as client:
            for _ in range(3):
                answer = await client.post("/v1/chat/completions", json=chat("b"))
                assert answer.status_code == 200
            assert running.supervisor.stats["starts_failed"] == 1  # no second local try
            assert running.supervisor.circuits()["b"]["state"] == "open"
            # a local profile that works still loads while b's circuit is open
            local = await client.post("/v1/chat/completions", json=chat("a"))
            assert local.json()["choices"][0]["message"]["content"].startswith("fake:a:")


async def test_openai_sdk_gets_an_answer_past_a_down_and_a_slow_upstream(
        tmp_path: Path) -> None:
    async def never_answers(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # accepts, then says nothing: a hung upstream

    async with trio.open_nursery() as nursery, remote_upstream("remote") as url:
        (listener,) = await nursery.start(partial(trio.serve_tcp, never_answers, 0,
                                                  host="127.0.0.1"))
        slow = f"http://127.0.0.1:{listener.socket.getsockname()[1]}/v1"
        closed = f"http://127.0.0.1:{process.free_port('127.0.0.1')}/v1"
        config = with_fallbacks(tmp_path, [
            {"name": "down", "base_url": closed, "model": "x", "timeout": "1s"},
            {"name": "slow", "base_url": slow, "model": "y", "timeout": "500ms"},
            {"name": "lan", "base_url": url, "model": "remote"},
        ], b_flags=BROKEN)
        async with open_server(config) as running:
            sdk = openai.OpenAI(base_url=running.url + "/v1", api_key="unused",
                                max_retries=0)
            completion = await trio.to_thread.run_sync(lambda: sdk.chat.completions.create(
                model="b", messages=[{"role": "user", "content": "hi"}]))
            assert completion.choices[0].message.content.startswith("fake:remote:")
            served = {f["name"]: f for f in running.frontend.fallbacks.status()}
            assert served["down"]["problem"].startswith("health check failed: ConnectError")
            assert "ReadTimeout" in served["slow"]["problem"]
            assert served["lan"]["served"] == 1
        nursery.cancel_scope.cancel()


async def test_a_crash_loop_opens_the_circuit_then_the_fallback_serves(tmp_path: Path) -> None:
    async with remote_upstream("remote") as url:
        # a loads fine and crashes on its first request, every time
        config = with_fallbacks(tmp_path, [{"name": "lan", "base_url": url,
                                            "model": "remote"}], a_flags={"fake-crash-after": 1},
                                restart={"max_failures": 2, "backoff": "10ms",
                                         "cooldown": "10m"})
        async with open_server(config) as running, httpx.AsyncClient(
                base_url=running.url, timeout=30) as client:
            statuses: list[int] = []
            while len(statuses) < 6:  # a 502 per crash, then the circuit opens
                answer = await client.post("/v1/chat/completions", json=chat("a"))
                statuses.append(answer.status_code)
                if answer.status_code == 200:
                    break
            assert statuses[-1] == 200 and set(statuses[:-1]) == {502}, statuses
            assert answer.json()["choices"][0]["message"]["content"].startswith("fake:remote:")
            assert running.supervisor.stats["crashes"] == 2
            assert running.supervisor.circuits()["a"]["state"] == "open"


async def test_a_profile_that_cannot_start_goes_to_the_fallback_and_a_keeps_serving(
        tmp_path: Path) -> None:
    async with remote_upstream("remote") as url:
        config = json.loads(config_text(tmp_path))
        config["profiles"]["b"]["model"] = str(tmp_path / "not-downloaded-yet.gguf")
        config["fallbacks"] = [{"name": "lan", "base_url": url, "model": "remote"}]
        async with open_server(parse_config(json.dumps(config))) as running, \
                httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            pid = (await client.post("/swapd/load", json={"model": "a"})).json()["pid"]
            answer = await client.post("/v1/chat/completions", json=chat("b"))
            assert answer.status_code == 200
            assert answer.json()["choices"][0]["message"]["content"].startswith("fake:remote:")
            assert running.supervisor.proc.pid == pid  # type: ignore[union-attr]
            assert running.supervisor.stats["swaps"] == 0
