"""Each real client, through a real swap on the real llama-server: what it shows.

One row per client: the request for ``tiny-b`` waits while swapd stops ``tiny-a`` and
loads ``tiny-b``, and the test observes, through that client's own API, whether the
stream arrives, where swapd's progress shows, what a too-long prompt gives, and
whether progress comes back in the next turn (the prompt llama-server renders from
the turn the client stored, via ``/apply-template``). The observations are the
compatibility table in docs/clients.md: the test fails when the two differ, and prints
the table it observed (``pytest -s``) to paste there. The "tested with" column records
the versions the table was made with; it is not compared (CI installs the newest).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from swapd.config import parse_config
from swapd.http.progress import PREFIX
from swapd.serve import Running, open_server

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import

DOCS = Path(__file__).parent.parent / "docs" / "clients.md"
LONG = " ".join(["word"] * 3000)
"""Longer than tiny-b's context (1024 tokens): llama-server's exceed_context_size_error."""


@attrs.frozen
class Row:
    """What one client showed; the table's row."""

    client: str
    package: str
    streams: str
    progress: str
    overflow: str
    sent_back: str


@attrs.frozen
class Seen:
    """What a client driver observed through its own API."""

    answer: str  # the streamed answer's text
    progress: str  # swapd's progress, as the client showed it (where, and the text)
    turn: dict[str, Any]  # the assistant turn as the client would store it
    ids: frozenset[str] = frozenset()  # the ids the client's chunks carried


class ErrorEvent(Exception):
    """An API's in-band error event that its SDK yields rather than raises."""

    def __init__(self, type: str | None, message: str) -> None:
        super().__init__(message)
        self.type = type


# Every driver samples greedily (temperature 0): what a tiny random model answers is
# then the same on every run, never an empty answer by chance, and never a first token
# that is half a UTF-8 character (see anthropic_stream).
Driver = Callable[[str, str], Seen]
"""(base URL, model) -> what one streamed request showed."""
Overflow = Callable[[str, str], BaseException]
"""(base URL, model) -> what a too-long streamed prompt raised (or yielded)."""


def openai_stream(url: str, model: str) -> Seen:
    import openai

    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reasoning, content, ids = "", "", set()
    for chunk in sdk.chat.completions.create(
            model=model, max_tokens=8, stream=True, temperature=0,
            messages=[{"role": "user", "content": "hello"}]):
        ids.add(chunk.id)
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
    return Seen(content, reasoning, {"role": "assistant", "content": content,
                                     "reasoning_content": reasoning}, frozenset(ids))


def openai_overflow(url: str, model: str) -> BaseException:
    import openai

    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        for _chunk in sdk.chat.completions.create(
                model=model, max_tokens=8, stream=True,
                messages=[{"role": "user", "content": LONG}]):
            pass
    except openai.APIError as error:
        return error
    raise AssertionError("no error")


def responses_stream(url: str, model: str) -> Seen:
    import openai

    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    text, reasoning, ids = "", "", set()
    for event in sdk.responses.create(model=model, input="hello", max_output_tokens=8,
                                      stream=True, temperature=0):
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.reasoning_text.delta":
            reasoning += event.delta
        elif event.type == "response.completed":
            ids.add(event.response.id)
    return Seen(text, reasoning, {"role": "assistant", "content": text}, frozenset(ids))


def responses_overflow(url: str, model: str) -> BaseException:
    import openai

    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        for event in sdk.responses.create(model=model, input=LONG, max_output_tokens=8,
                                          stream=True):
            if event.type == "error":  # the Responses API's in-band error: an event
                return ErrorEvent(event.code, event.message)
    except openai.APIError as error:
        return error
    raise AssertionError("no error")


def litellm_stream(url: str, model: str) -> Seen:
    """litellm with ``merge_reasoning_content_in_choices`` (what Open WebUI's litellm
    setups use): reasoning arrives inside ``content`` as a ``<think>`` block."""
    import litellm

    content, ids = "", set()
    for chunk in litellm.completion(
            model="openai/" + model, api_base=url + "/v1", api_key="unused", max_tokens=8,
            stream=True, merge_reasoning_content_in_choices=True, temperature=0,
            messages=[{"role": "user", "content": "hello"}]):
        ids.add(chunk.id)
        content += chunk.choices[0].delta.content or ""
    think = re.match(r"<think>(.*?)</think>", content, re.S)
    return Seen(content[think.end():] if think else content,
                f"<think>{think.group(1)}</think>" if think else "",
                {"role": "assistant", "content": content}, frozenset(ids))


def litellm_overflow(url: str, model: str) -> BaseException:
    import litellm

    try:
        for _chunk in litellm.completion(
                model="openai/" + model, api_base=url + "/v1", api_key="unused",
                max_tokens=8, stream=True, messages=[{"role": "user", "content": LONG}]):
            pass
    except Exception as error:
        return error
    raise AssertionError("no error")


def langchain_stream(url: str, model: str) -> Seen:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=url + "/v1", api_key="unused", model=model,  # type: ignore[arg-type]
                      max_tokens=8, max_retries=0, temperature=0)
    merged: Any = None
    for piece in chat.stream("hello"):
        merged = piece if merged is None else merged + piece
    reasoning = json.dumps(merged.additional_kwargs) + json.dumps(merged.content)
    return Seen(merged.text, reasoning if PREFIX in reasoning else "",
                {"role": "assistant", "content": merged.text,
                 **merged.additional_kwargs}, frozenset({merged.id}))


def langchain_overflow(url: str, model: str) -> BaseException:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=url + "/v1", api_key="unused", model=model,  # type: ignore[arg-type]
                      max_tokens=8, max_retries=0)
    try:
        for _piece in chat.stream(LONG):
            pass
    except Exception as error:
        return error
    raise AssertionError("no error")


def anthropic_stream(url: str, model: str) -> Seen:
    """Greedy (temperature 0): with sampling, a tiny model's first token is now and then
    half of a UTF-8 character, and llama-server then never sends ``message_start`` (it
    does only for the partial result of the first token, which it holds back while the
    text is incomplete; docs/faults.md), so the SDK has no message to return."""
    import anthropic

    sdk = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    with sdk.messages.stream(model=model, max_tokens=8, extra_body={"temperature": 0},
                             messages=[{"role": "user", "content": "hello"}]) as stream:
        message = stream.get_final_message()
    text = "".join(block.text for block in message.content if block.type == "text")
    thinking = "".join(block.thinking for block in message.content if block.type == "thinking")
    return Seen(text, thinking, {"role": "assistant", "content": text},
                frozenset({message.id}))


def anthropic_overflow(url: str, model: str) -> BaseException:
    import anthropic

    sdk = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    try:
        with sdk.messages.stream(model=model, max_tokens=8,
                                 messages=[{"role": "user", "content": LONG}]) as stream:
            stream.get_final_message()
    except anthropic.APIError as error:
        return error
    raise AssertionError("no error")


def ollama_stream(url: str, model: str) -> Seen:
    """Ollama's own API (``/api/chat``), asking for thinking: progress shows there."""
    import ollama

    client = ollama.Client(host=url)
    content, thinking = "", ""
    for part in client.chat(model, messages=[{"role": "user", "content": "hello"}],
                            think=True, stream=True, options={"num_predict": 8,
                                                              "temperature": 0}):
        content += part.message.content or ""
        thinking += part.message.thinking or ""
    return Seen(content, thinking, {"role": "assistant", "content": content,
                                    "reasoning_content": thinking})  # NDJSON has no ids


def ollama_overflow(url: str, model: str) -> BaseException:
    import ollama

    client = ollama.Client(host=url)
    try:
        for _part in client.chat(model, messages=[{"role": "user", "content": LONG}],
                                 stream=True, options={"num_predict": 8}):
            pass
    except ollama.ResponseError as error:
        return error
    raise AssertionError("no error")


CLIENTS: dict[str, tuple[str, Driver, Overflow]] = {
    "openai (Python SDK)": ("openai", openai_stream, openai_overflow),
    "openai (Python SDK, Responses API)": ("openai", responses_stream, responses_overflow),
    "litellm, merging reasoning into content": ("litellm", litellm_stream, litellm_overflow),
    "langchain-openai (ChatOpenAI)": ("langchain-openai", langchain_stream,
                                      langchain_overflow),
    "anthropic (Python SDK, /v1/messages)": ("anthropic", anthropic_stream,
                                            anthropic_overflow),
    "ollama (Python client, /api/chat)": ("ollama", ollama_stream, ollama_overflow),
}


def real_config(tmp_path: Path, models: Path, binary: Path) -> str:
    flags = {"threads": 1, "jinja": True}
    return json.dumps({
        "listen": "127.0.0.1:0", "state_dir": str(tmp_path / "state"),
        "llama_server": {"command": str(binary)},
        "timeouts": {"start": "60s", "stop": "10s"},
        "profiles": {
            "tiny-a": {"model": str(models / "a.gguf"), "flags": {"ctx-size": 2048, **flags}},
            "tiny-b": {"model": str(models / "b.gguf"), "flags": {"ctx-size": 1024, **flags}},
        },
    })


async def swap_to_b_with(running: Running, client: httpx.AsyncClient,
                         call: Callable[[str, str], Any]) -> Any:
    """``call`` for tiny-b while tiny-a is the loaded model: it waits for a swap."""
    assert (await client.post("/swapd/load", json={"model": "tiny-a"})).status_code == 200
    swaps = running.supervisor.stats["swaps"]
    result = await trio.to_thread.run_sync(call, running.url, "tiny-b")
    assert running.supervisor.stats["swaps"] == swaps + 1  # it went through a swap
    return result


async def observe(running: Running, client: httpx.AsyncClient, name: str) -> Row:
    package, stream, overflow = CLIENTS[name]
    seen: Seen = await swap_to_b_with(running, client, stream)
    assert seen.answer, f"{name}: no answer text"
    assert len(seen.ids) <= 1, f"{name}: the stream carried several ids: {seen.ids}"
    streams = "yes, one id" if seen.ids else "yes"
    if not seen.progress:
        progress = "not shown (keep-alives only)"
    elif seen.progress.startswith("<think>"):
        progress = "`<think>` block in `content`"
    elif seen.progress.startswith(PREFIX):
        progress = ("`message.thinking`" if name.startswith("ollama") else
                    "`reasoning_content`")
    else:
        progress = "`additional_kwargs`"
    rendered = await client.post("/apply-template", json={"model": "tiny-b", "messages": [
        {"role": "user", "content": "hello"}, seen.turn,
        {"role": "user", "content": "and again"}]})
    assert rendered.status_code == 200, rendered.text
    prompt = rendered.json()["prompt"]
    assert seen.answer.strip() in prompt  # the model's own answer is kept
    sent_back = "progress sent back" if PREFIX.strip() in prompt else "stripped"
    error: BaseException = await swap_to_b_with(running, client, overflow)
    assert "context" in str(error), f"{name}: {error!r}"
    raised = ("an `error` event" if isinstance(error, ErrorEvent) else
              f"`{type(error).__module__.split('.')[0]}.{type(error).__name__}`")
    if "exceed_context_size_error" in str(error) or getattr(
            error, "type", None) == "exceed_context_size_error":
        raised += " (`exceed_context_size_error`)"
    return Row(name, f"{package} {version(package)}", streams, progress, raised, sent_back)


@pytest.mark.real_llama
async def test_every_client_through_a_swap(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path) -> None:
    config = parse_config(real_config(tmp_path, tiny_models, llama_server_bin))
    rows = []
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=120) as client:
        for name in CLIENTS:
            rows.append(await observe(running, client, name))
    print(render(rows))
    assert [attrs.evolve(row, package="") for row in rows] == [
        attrs.evolve(row, package="") for row in documented()], render(rows)


def render(rows: list[Row]) -> str:
    head = ("| client | tested with | streams through a swap | progress shown as "
            "| too-long prompt through a swap gives | progress in the next turn |\n"
            "|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r.client} | {r.package} | {r.streams} | {r.progress} | "
                          f"{r.overflow} | {r.sent_back} |\n" for r in rows)


def documented() -> list[Row]:
    text = DOCS.read_text()
    start = text.index("| client | tested with |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(Row(*[cell.strip() for cell in line.strip("|").split(" | ")]))
    return rows
