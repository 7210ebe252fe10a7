"""Errors reach each client the way the model gave them, whether the request waited
for a swap or not (issue 16, item 3), with the real ``openai`` client."""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import trio

from swapd.http.progress import line
from tests.test_api import chat, sse_events, swapd

LONG = " ".join(["word"] * 5000)
"""A prompt longer than profile b's ctx-size (4096): the fake refuses it as llama-server
does, 400 ``exceed_context_size_error``."""


def overflow(sdk: openai.OpenAI, model: str, stream: bool) -> None:
    messages = [{"role": "user", "content": LONG}]
    if stream:
        for _chunk in sdk.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                                  stream=True):
            pass
    else:
        sdk.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]


async def test_a_context_overflow_keeps_its_type_through_a_swap(tmp_path: Path) -> None:
    """A stream that waited for b's load (its 200 and progress already out) ends with b's
    own error object, in-band: the SDK raises it with llama-server's type and code,
    where it used to get swapd's generic ``model_failed``."""
    async with swapd(tmp_path) as (running, client):
        assert (await client.post("/swapd/load", json={"model": "a"})).status_code == 200
        sdk = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError) as waited:
            await trio.to_thread.run_sync(overflow, sdk, "b", True)
        assert waited.value.type == "exceed_context_size_error"
        assert str(waited.value.code) == "400"  # llama-server says 400; the SDK keeps a str
        assert "exceeds the available context size" in waited.value.message
        assert waited.value.body["n_ctx"] == 4096  # type: ignore[index]
        # b is loaded now: the same prompt gets the child's 400 as an HTTP status
        with pytest.raises(openai.BadRequestError) as loaded:
            await trio.to_thread.run_sync(overflow, sdk, "b", True)
        assert loaded.value.type == "exceed_context_size_error"


async def test_an_open_circuit_refuses_a_stream_before_its_200(tmp_path: Path) -> None:
    """b fails its start once (max_failures 1): its circuit is open for 10 minutes, so a
    streaming chat for it is a 503 ``circuit_open`` with Retry-After, as a status."""
    async with swapd(tmp_path, b_flags={"fake-exit-at-start": 3},
                     restart={"max_failures": 1, "cooldown": "10m"}) as (running, client):
        failed = await client.post("/v1/chat/completions", json=chat("b"))
        assert failed.status_code == 503
        assert running.supervisor.circuits()["b"]["state"] == "open"
        async with client.stream("POST", "/v1/chat/completions",
                                  json=chat("b", stream=True)) as refused:
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) > 500
            body = await refused.aread()
        assert b'"circuit_open"' in body


async def test_a_waiting_stream_says_ready_last_and_keeps_alive_at_its_setting(
        tmp_path: Path) -> None:
    """While b loads (2.5 s, reasoning lines changing every second), no keep-alive
    comment is sent before ``progress.keepalive`` (10 s) of silence: only the first one.
    The last progress line, "b is ready", is never lost to the lease arriving."""
    async with swapd(tmp_path, progress={"keepalive": "10s"},
                     b_flags={"fake-load-ms": 2500}) as (_running, client), client.stream(
            "POST", "/v1/chat/completions", json=chat("b", stream=True)) as response:
        text = (await response.aread()).decode()
    comments, data = sse_events(text)
    assert [c for c in comments if "swapd loading" in c] == [": swapd loading b"]
    lines = [chunk["choices"][0]["delta"]["reasoning_content"] for chunk in data[:-1]
             if "reasoning_content" in chunk["choices"][0]["delta"]]
    assert lines[-1] == line("b is ready")


async def test_a_bug_in_one_exchange_ends_its_connection_not_swapd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An error no code path expected (here: injected into the proxy) closes that
    connection and is logged; the listener keeps serving everyone else."""
    async with swapd(tmp_path) as (running, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        proxy = type(running.fastpath._inference)

        async def broken(self: object, ex: object) -> None:
            raise RuntimeError("injected")

        monkeypatch.setattr(proxy, "__call__", broken)
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v1/chat/completions", json=chat("a"))
        monkeypatch.undo()
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        assert "unexpected error" in caplog.text and "injected" in caplog.text


async def test_anthropic_streams_wait_with_pings_and_end_with_their_own_error(
        tmp_path: Path) -> None:
    """A ``/v1/messages`` stream waits for its load with Anthropic's ``event: ping``
    (not OpenAI chunks), and a start that fails ends it with ``event: error``, which
    the Anthropic SDK raises: an OpenAI-shaped error it skipped, ending the answer
    short with no exception."""
    async with swapd(tmp_path, progress={"keepalive": "300ms"},
                     b_flags={"fake-exit-at-start": 3, "fake-load-ms": 1000}) as (
            running, client):
        async with client.stream("POST", "/v1/messages", json={
                "model": "b", "max_tokens": 8, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}) as response:
            assert response.status_code == 200  # waited: the early 200
            text = (await response.aread()).decode()
        assert text.startswith("event: ping\ndata: {\"type\":\"ping\"}\n\n")
        assert "reasoning_content" not in text and "\n: " not in text
        assert "event: error\ndata: " in text and "overloaded_error" in text
        sdk = anthropic.Anthropic(base_url=running.url, api_key="unused", max_retries=0)

        def stream_b() -> None:
            with sdk.messages.stream(model="b", max_tokens=8, messages=[
                    {"role": "user", "content": "hi"}]) as stream:
                for _text in stream.text_stream:
                    pass

        with pytest.raises(anthropic.APIStatusError) as caught:
            await trio.to_thread.run_sync(stream_b)
        assert "exit" in str(caught.value) or "start" in str(caught.value)


async def test_a_text_completion_stream_waits_with_keepalives(tmp_path: Path) -> None:
    """``/v1/completions`` streams no longer sit silent for a whole load: an early 200,
    SSE comments while b loads, then b's own stream (the SDK reads it unchanged)."""
    async with swapd(tmp_path, progress={"keepalive": "300ms"},
                     b_flags={"fake-load-ms": 1500}) as (running, client):
        async with client.stream("POST", "/v1/completions", json={
                "model": "b", "prompt": "x", "stream": True}) as response:
            first = await response.aiter_raw().__anext__()
        assert first.startswith(b": swapd loading b")
        sdk = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)

        def complete(model: str) -> str:
            return "".join(chunk.choices[0].text for chunk in sdk.completions.create(
                model=model, prompt="x", stream=True) if chunk.choices)

        assert (await trio.to_thread.run_sync(complete, "a")).startswith("fake:a:")


async def test_a_client_gone_as_its_lease_arrives_gives_the_lease_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease came, then the write of the "b is ready" line fails (the client left
    just then): the lease must go back, not stay held by an exchange that ended."""
    from swapd.http.fastpath import ClientGone, Exchange

    body_part = Exchange.body_part

    async def leaves_at_ready(self: Exchange, data: bytes) -> None:
        if b"is ready" in data:
            raise ClientGone
        await body_part(self, data)

    monkeypatch.setattr(Exchange, "body_part", leaves_at_ready)
    async with swapd(tmp_path) as (running, client):
        with pytest.raises(httpx.HTTPError):
            async with client.stream("POST", "/v1/chat/completions",
                                     json=chat("b", stream=True)) as response:
                await response.aread()
        assert running.supervisor.profile_state("b").value == "ready"
        with trio.fail_after(5):
            while running.supervisor.n_inflight:
                await trio.sleep(0.01)


async def test_nan_and_infinity_are_the_clients_400(tmp_path: Path) -> None:
    """Python's json reads NaN and Infinity; llama-server's parser does not, so they
    were forwarded and came back as the model's 500."""
    async with swapd(tmp_path) as (_running, client):
        for constant in ("NaN", "Infinity", "-Infinity"):
            body = '{"model": "a", "messages": [], "temperature": ' + constant + "}"
            for path in ("/v1/chat/completions", "/api/chat"):
                answer = await client.post(path, content=body)
                assert answer.status_code == 400, (path, constant, answer.text)
                assert "not a JSON number" in answer.text
