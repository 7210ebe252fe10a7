"""Progress lines come out of what clients send back exactly, wherever they put them.

Clients keep the reasoning they were streamed and send it back in the next turn: as
``reasoning_content`` (most), merged into ``content`` as a ``<think>`` block (litellm's
``merge_reasoning_content_in_choices``, several UIs), as OpenRouter-style
``reasoning_details``, as Responses API reasoning items, or as Anthropic thinking blocks;
some join the deltas after trimming each one. Only swapd's lines may go, never a
character of the model's own text, and never a key a provider requires.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from swapd.http.progress import (
    END,
    PREFIX,
    OneId,
    ProgressStream,
    describe,
    line,
    strip_progress,
)
from tests.test_api import chat, sse_events, swapd

LINES = [line("queued for a"), line("loading a: 40% (ready in ~3s)"), line("a is ready")]


def assistant(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", **fields}]}


def turn(payload: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = payload["messages"][1]
    return message


def test_deltas_joined_without_newlines_keep_the_models_reasoning() -> None:
    joined = "".join(text.strip() for text in LINES) + "The user greets me.\nReply."
    payload = assistant(content="Hello", reasoning_content=joined)
    assert strip_progress(payload)
    assert turn(payload)["reasoning_content"] == "The user greets me.\nReply."


def test_a_field_of_only_progress_stays_empty() -> None:
    """DeepSeek-style APIs reject an assistant turn without reasoning_content."""
    payload = assistant(content="Hello", reasoning_content="".join(LINES),
                        reasoning="".join(LINES))
    assert strip_progress(payload)
    assert turn(payload) == {"role": "assistant", "content": "Hello",
                             "reasoning_content": "", "reasoning": ""}


def test_a_think_block_of_only_progress_goes_whole() -> None:
    payload = assistant(content="<think>" + "".join(LINES) + "</think>\n\nHello")
    assert strip_progress(payload)
    assert turn(payload)["content"] == "Hello"


def test_a_think_block_with_the_models_reasoning_keeps_it() -> None:
    payload = assistant(content="<think>" + "".join(LINES) + "Greet back.</think>Hello")
    assert strip_progress(payload)
    assert turn(payload)["content"] == "<think>Greet back.</think>Hello"


def test_content_parts_reasoning_details_and_thinking_blocks() -> None:
    payload = assistant(
        content=[{"type": "thinking", "thinking": LINES[0] + "mine", "signature": "s"},
                 {"type": "text", "text": "<think>" + LINES[1] + "</think>Hi"}],
        reasoning_details=[{"type": "reasoning.text", "text": "".join(LINES), "index": 0},
                           {"type": "reasoning.summary", "summary": LINES[2] + "sum"}])
    assert strip_progress(payload)
    assert turn(payload)["content"] == [
        {"type": "thinking", "thinking": "mine", "signature": "s"},
        {"type": "text", "text": "Hi"}]
    assert turn(payload)["reasoning_details"] == [
        {"type": "reasoning.text", "text": "", "index": 0},
        {"type": "reasoning.summary", "summary": "sum"}]


def test_responses_api_reasoning_items_and_assistant_messages() -> None:
    payload: dict[str, Any] = {"model": "a", "input": [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_1",
         "summary": [{"type": "summary_text", "text": "".join(LINES)}],
         "content": [{"type": "reasoning_text", "text": LINES[0] + "think"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "<think>" + LINES[1] + "</think>Hi"}]},
    ]}
    assert strip_progress(payload)
    reasoning, message = payload["input"][1], payload["input"][2]
    assert reasoning["summary"] == [{"type": "summary_text", "text": ""}]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "think"}]
    assert message["content"] == [{"type": "output_text", "text": "Hi"}]


def test_what_the_user_wrote_is_never_touched() -> None:
    """A user quoting a progress line (or pasting a transcript) keeps their words."""
    payload = {"messages": [{"role": "user", "content": "".join(LINES)},
                            {"role": "system", "content": LINES[0]}]}
    before = copy.deepcopy(payload)
    assert not strip_progress(payload)
    assert payload == before


def test_an_unmarked_prefix_is_the_models_text() -> None:
    """Only a whole marked line is swapd's: the model writing "[swapd] " is kept."""
    payload = assistant(content="[swapd] is a daemon", reasoning_content="[swapd] hmm\nok")
    before = copy.deepcopy(payload)
    assert not strip_progress(payload)
    assert payload == before


def test_deep_nesting_is_no_crash() -> None:
    deep: Any = LINES[0]
    for _ in range(5000):
        deep = [deep]
    payload = assistant(content=deep)
    assert strip_progress(payload)
    inner = turn(payload)["content"]
    while isinstance(inner, list):
        inner = inner[0]
    assert inner == ""


def test_a_line_cannot_carry_its_own_end_or_a_newline() -> None:
    """A profile or phase text with a newline or the marker still makes one line."""
    chunk = ProgressStream("a").reasoning("loading\nx" + END + "y")
    assert chunk is not None
    text = json.loads(chunk[len(b"data: "):])["choices"][0]["delta"]["reasoning_content"]
    assert text == PREFIX + "loading xy" + END + "\n"


MODEL_TEXT = st.text(st.characters(blacklist_characters=END), max_size=40)


@given(st.lists(st.tuples(st.sampled_from(LINES), MODEL_TEXT), max_size=6),
       st.sampled_from(["keep", "strip", "rstrip"]))
def test_any_interleaving_loses_exactly_the_progress(
        pieces: list[tuple[str, str]], join: str) -> None:
    """However a client joined them, the model's text comes back as the model wrote it."""
    def trimmed(text: str) -> str:
        return {"keep": text, "strip": text.strip("\n"), "rstrip": text.rstrip()}[join]

    sent = "".join(trimmed(progress) + own for progress, own in pieces)
    payload = assistant(reasoning_content=sent)
    strip_progress(payload)
    assert turn(payload)["reasoning_content"] == "".join(own for _, own in pieces)


def test_with_nothing_ahead_a_request_is_starting_not_queued() -> None:
    """A profile whose start fails at once used to show "queued for broken" right before
    its start error: with nothing loaded and nobody ahead, its start is what comes next."""
    idle = {"state": "idle", "active": None, "waiting": {"broken": 1}, "phase": None}
    assert describe(idle, "broken") == "starting broken"
    assert describe({**idle, "waiting": {"broken": 1, "a": 2}}, "broken") == (
        "queued for broken (2 waiting ahead)")


async def test_a_stream_for_a_model_that_cannot_start_never_says_queued(
        tmp_path: Path) -> None:
    async with swapd(tmp_path, b_flags={"fake-exit-at-start": 3}) as (_running, client), \
            client.stream("POST", "/v1/chat/completions",
                          json=chat("b", stream=True)) as response:
        _comments, data = sse_events((await response.aread()).decode())
    said = [chunk["choices"][0]["delta"]["reasoning_content"] for chunk in data
            if isinstance(chunk, dict) and chunk.get("choices")]
    assert said and not any("queued" in text for text in said), said
    assert data[-2]["error"]["code"] == "unavailable" and data[-1] == "[DONE]"


async def test_a_stream_that_waited_carries_one_id(tmp_path: Path) -> None:
    """Clients take a stream's id from its first chunk (swapd's progress): the model's
    chunks get that id too, so the merged message's id is every chunk's id."""
    async with swapd(tmp_path) as (_running, client), client.stream(
            "POST", "/v1/chat/completions", json=chat("b", stream=True)) as response:
        _comments, data = sse_events((await response.aread()).decode())
    chunks = [chunk for chunk in data if isinstance(chunk, dict)]
    assert any("reasoning_content" in c["choices"][0]["delta"] for c in chunks)
    assert any(c["choices"][0]["delta"].get("content") for c in chunks)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert chunks[0]["id"].startswith("chatcmpl-swapd-")


def test_one_id_across_any_split_of_the_models_stream() -> None:
    """The model's id is replaced wherever reads split its events, and only the id: a
    tool call's own ``id`` and the content stay as they were."""
    model = (b'data: {"choices":[{"delta":{"tool_calls":[{"id":"call_1"}]}}],'
             b'"id":"chatcmpl-model"}\n\ndata: {"id": "chatcmpl-model","x":"id"}\n\n'
             b"data: [DONE]\n\n")
    want = model.replace(b'"id":"chatcmpl-model"', b'"id":"chatcmpl-swapd-1"').replace(
        b'"id": "chatcmpl-model"', b'"id":"chatcmpl-swapd-1"')
    for split in range(1, len(model)):
        one = OneId("chatcmpl-swapd-1")
        assert one(model[:split]) + one(model[split:]) + one.flush() == want


def test_beside_a_busy_model_with_room_a_request_is_starting_not_queued() -> None:
    """Seen with Open WebUI (max_models 2, the task model pinned and busy): the chat
    model's stream said "queued for tiny-chat: tiny-task is serving other requests (0
    waiting ahead)" and then loaded at once beside it. With one model at a time, that
    line is the truth: it waits for tiny-task's requests to end."""
    busy = {"state": "ready", "active": "tiny-task", "waiting": {"tiny-chat": 1},
            "phase": None, "resident": [{"name": "tiny-task", "state": "ready"}],
            "residency": {"mode": "count", "max_models": 2}}
    assert describe(busy, "tiny-chat") == "starting tiny-chat"
    assert describe({**busy, "residency": {"mode": "budget", "max_models": None}},
                    "tiny-chat") == "starting tiny-chat"
    one = {**busy, "residency": {"mode": "count", "max_models": 1}}
    assert describe(one, "tiny-chat") == (
        "queued for tiny-chat: tiny-task is serving other requests (0 waiting ahead)")


def test_one_id_holds_back_a_bounded_amount_of_an_unended_event() -> None:
    """An upstream that never ends an event (no blank line) is relayed as it comes past
    MAX_HELD, rather than held in memory until the stream ends."""
    from swapd.http.progress import MAX_HELD

    one = OneId("chatcmpl-swapd-1")
    assert one(b'data: {"id":"chatcmpl-model","x":"') == b""
    piece = b"y" * (MAX_HELD // 4)
    out = [one(piece) for _ in range(8)]
    assert sum(map(len, out)) > 0 and all(len(o) <= MAX_HELD + len(piece) + 64 for o in out)
    assert b"".join(out) + one.flush() == b'data: {"id":"chatcmpl-model","x":"' + piece * 8
