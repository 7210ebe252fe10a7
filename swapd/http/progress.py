"""Load progress on a waiting request's own SSE stream, in shapes no client chokes on.

What may go on the wire before the model's own stream (spec section 4):

* SSE comments (``: swapd loading qwen``): every parser ignores them, and they keep
  proxies and clients from timing out;
* complete ``chat.completion.chunk`` objects whose only payload is
  ``delta.reasoning_content``: clients show it as "thinking" and never as the answer
  (chat completions only);
* the API's own keep-alive (Anthropic's ``event: ping``) and, to end the stream, its
  own error event (``StreamShape``).

Never other named events, never other JSON, never text in ``content``. Every progress
line starts with ``PREFIX`` and ends with ``END`` (an invisible word joiner, which no
client's trim removes), so ``strip_progress`` removes exactly swapd's lines from what a
client sends back, wherever it put them (``reasoning_content``, ``<think>`` in
``content``, ``reasoning_details``, Responses reasoning items, Anthropic thinking) and
however it joined the deltas, and never a character of the model's own text.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

PREFIX = "[swapd] "
END = "\u2060"
"""Ends each progress line: a word joiner (U+2060) shows as nothing, is no whitespace to
any trim, and cannot occur in the line's own text (``ProgressStream.reasoning``)."""
_PREFIX_BYTES = PREFIX.strip().encode()
_LINE = re.compile(re.escape(PREFIX) + "(?:(?!" + re.escape(PREFIX) + ")[^" + END + "\n])*"
                   + END + "\n?")
"""One progress line as a client sends it back, with or without its newline: from the
last ``PREFIX`` before an ``END`` (the model may write "[swapd] " itself)."""
_THINK_OF_LINES = re.compile("<think>\\s*(?:" + _LINE.pattern + "\\s*)+</think>\\s*")
"""A ``<think>`` block that holds nothing but progress (a client merged reasoning into
``content``): swapd's, so it goes whole."""

DONE = b"data: [DONE]\n\n"


def comment(text: str) -> bytes:
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


def data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def line(text: str) -> str:
    """``text`` as one progress line, marked so it can be removed exactly."""
    return PREFIX + text + END + "\n"


class ProgressStream:
    """Builds the progress chunks of one waiting request (one id, one ``created``)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = "chatcmpl-swapd-" + uuid.uuid4().hex[:16]
        self.created = int(time.time())
        self._last_text = ""

    def reasoning(self, text: str) -> bytes | None:
        """A chunk saying ``text`` as reasoning, or None if it says nothing new."""
        # One line, ended only by END, with no PREFIX inside (see _LINE).
        text = text.replace(END, "").replace("\n", " ").replace(PREFIX, "(swapd) ")
        if text == self._last_text:
            return None
        self._last_text = text
        return data({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "delta": {"role": "assistant", "reasoning_content": line(text)},
                "finish_reason": None,
            }],
        })


MAX_HELD = 64 * 1024
"""Bytes of an unfinished event ``OneId`` holds back at most (llama-server's events are
a few hundred bytes)."""


class OneId:
    """Gives the model's chunks the id the client already has from the progress chunks.

    Every client takes a stream's id from its first chunk (the SDKs' stream
    accumulators, the AI SDK's response metadata; litellm even forces it onto every
    chunk), and the model's own id does not exist until the model answers. So a stream
    that waited keeps one id from first chunk to last: the model's id is replaced by
    swapd's, event by event, and nothing else in an event changes.
    """

    def __init__(self, new: str) -> None:
        self._new = f'"id":"{new}"'.encode()
        self._old: re.Pattern[bytes] | None = None
        self._held = b""  # the part of an event still to come

    def __call__(self, data: bytes) -> bytes:
        """The whole events of ``data`` (with those held), ids replaced; the rest held,
        up to ``MAX_HELD`` bytes (past that, an upstream that never ends an event gets
        its bytes relayed as they are: the rewrite is not worth unbounded memory)."""
        data = self._held + data
        end = max((at + len(sep) for sep in (b"\n\n", b"\r\n\r\n")
                   if (at := data.rfind(sep)) >= 0), default=0)
        if len(data) - end > MAX_HELD:
            end = len(data)
        data, self._held = data[:end], data[end:]
        return self._replaced(data) if data else b""

    def flush(self) -> bytes:
        """What is held when the body ends (a stream cut inside an event)."""
        data, self._held = self._held, b""
        return self._replaced(data)

    def _replaced(self, data: bytes) -> bytes:
        if self._old is None:
            self._old = _first_id(data)
            if self._old is None:
                return data
        return self._old.sub(self._new, data)


def _first_id(events: bytes) -> re.Pattern[bytes] | None:
    """The first chunk's ``"id": "..."`` in ``events``, as a pattern; None if none yet."""
    for event in events.splitlines():
        if event.startswith(b"data:") and event[5:].strip().startswith(b"{"):
            try:
                value = json.loads(event[5:]).get("id")
            except (ValueError, AttributeError):
                return None
            if not isinstance(value, str) or not value:
                return None
            return re.compile(rb'"id"\s*:\s*"' + re.escape(value.encode()) + rb'"')
    return None


def event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\n" + data(obj)


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 504: "overloaded_error"}
"""Anthropic's error ``type`` for an HTTP status (anything else: ``api_error``)."""


class StreamShape:
    """What swapd says on a waiting request's stream, in its API's own shape: a
    keep-alive, an error that ends the stream, and (chat completions) progress lines.

    Every parser skips an SSE comment, but an error must be an event the client's SDK
    raises: the OpenAI SDKs raise on a ``data:`` object with ``error``; the Anthropic
    SDK skips every event without a name and raises on ``event: error``; the Responses
    API's clients read ``event: error`` with ``code`` and ``message``.
    """

    progress = False  # reasoning lines: only chat completions have a place for them

    def keepalive(self, profile: str) -> bytes:
        return comment(f"swapd loading {profile}")

    def error(self, status: int, message: str, type_: str, code: str) -> bytes:
        """The in-band error that ends a stream whose 200 was already sent."""
        return data({"error": {"message": message, "type": type_, "code": code}}) + DONE

    def upstream_error(self, status: int, error: dict[str, Any]) -> bytes:
        """The upstream's own error object, unchanged where the shape allows."""
        return data({"error": error}) + DONE


class ChatShape(StreamShape):
    progress = True


class MessagesShape(StreamShape):
    """Anthropic's Messages API: ``event: ping`` and ``event: error``."""

    def keepalive(self, profile: str) -> bytes:
        return event("ping", {"type": "ping"})

    def error(self, status: int, message: str, type_: str, code: str) -> bytes:
        return event("error", {"type": "error", "error": {
            "type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}})

    def upstream_error(self, status: int, error: dict[str, Any]) -> bytes:
        if "message" in error and isinstance(error.get("type"), str) and set(error) <= {
                "type", "message"}:
            return event("error", {"type": "error", "error": error})  # already Anthropic's
        return self.error(status, str(error.get("message", error)), "", "")


class ResponsesShape(StreamShape):
    """OpenAI's Responses API: an ``error`` event with ``code`` and ``message``."""

    def error(self, status: int, message: str, type_: str, code: str) -> bytes:
        return event("error", {"type": "error", "code": code, "message": message,
                               "param": None, "sequence_number": 0})

    def upstream_error(self, status: int, error: dict[str, Any]) -> bytes:
        code = error.get("code")  # a string here; llama-server's is the HTTP status
        return event("error", {"type": "error", "code": code if isinstance(code, str) else
                               error.get("type"), "message": error.get("message", ""),
                               "param": error.get("param"), "sequence_number": 0})


def shape_for(path: str) -> StreamShape | None:
    """The shape of a streaming route that waits with an early 200, or None (it waits
    without one: its errors stay HTTP statuses)."""
    if path.endswith("/chat/completions"):
        return ChatShape()
    if path.endswith("/completions") or path == "/completion":
        return StreamShape()
    if path.endswith("/messages"):
        return MessagesShape()
    if path.endswith("/responses"):
        return ResponsesShape()
    return None


LOAD_FRACTION_CAP = 0.99
"""An estimated load shows at most this until the child is ready (it may take longer
than last time)."""


def load_fraction(elapsed: float, expected: float | None) -> float | None:
    """How far a load is, from the profile's last load time; None without one."""
    if not expected:
        return None
    return min(LOAD_FRACTION_CAP, max(0.0, elapsed / expected))


def describe(status: dict[str, Any], profile: str) -> str:
    """One progress line from the supervisor's status, as seen by a request for ``profile``."""
    for row in status.get("resident") or ():
        if row.get("name") == profile and row.get("state") == "starting" \
                and status.get("active") != profile:
            # Several models load at once: this request's own, not the latest one.
            status = {**status, "active": profile, "state": "starting", "phase": None,
                      "load_elapsed": row.get("load_elapsed"),
                      "load_expected": row.get("load_expected")}
    state = status["state"]
    active = status["active"]
    if active == profile and status.get("phase"):
        return str(status["phase"])
    if active == profile and state == "starting":
        elapsed = status.get("load_elapsed") or 0.0
        expected = status.get("load_expected")
        fraction = load_fraction(elapsed, expected)
        if expected and fraction is not None:
            percent = int(100 * fraction)
            left = max(0.0, expected - elapsed)
            return f"loading {profile}: {percent}% (ready in ~{left:.0f}s)"
        return f"loading {profile} ({elapsed:.0f}s so far, first load: no estimate yet)"
    if active == profile and state == "ready":
        return f"{profile} is ready"
    ahead = sum(n for name, n in status["waiting"].items() if name != profile)
    loading = [row["name"] for row in status.get("resident") or ()
               if row.get("state") == "starting" and row.get("name") != profile]
    if loading:  # another model loads first: a stop meanwhile is for its room, not ours
        return (f"queued for {profile}: {loading[0]} is loading for other requests "
                f"({ahead} waiting ahead)")
    if state == "stopping" and active:
        return f"stopping {active} to load {profile}"
    cap = (status.get("residency") or {}).get("max_models", 1)
    if state == "ready" and not ahead and (cap is None or cap > 1):
        return f"starting {profile}"  # it may load beside the one serving: no queue yet
    if active and state in ("ready", "starting"):
        doing = "serving other requests" if state == "ready" else "loading for other requests"
        return f"queued for {profile}: {active} is {doing} ({ahead} waiting ahead)"
    if ahead:
        return f"queued for {profile} ({ahead} waiting ahead)"
    return f"starting {profile}"  # nothing ahead: its start is next (or failing now)


def strip_progress(payload: dict[str, Any]) -> bool:
    """Remove swapd's progress lines from what a client sends back; True if changed.

    Only the model's turns are looked at (chat and Anthropic ``messages`` from the
    assistant, Responses ``input`` items from the assistant or of type ``reasoning``),
    every string in them, at any depth. A field that held only progress stays, empty:
    some APIs reject an assistant turn without its ``reasoning_content``.
    """
    turns: list[Any] = []
    for key in ("messages", "input"):
        items = payload.get(key)
        if isinstance(items, list):
            turns += [item for item in items if isinstance(item, dict) and (
                item.get("role") == "assistant" or item.get("type") == "reasoning")]
    changed = False
    stack: list[dict[str, Any] | list[Any]] = turns
    while stack:  # by hand, not recursion: a client's JSON may nest a thousand deep
        node = stack.pop()
        keys: Any = node.keys() if isinstance(node, dict) else range(len(node))
        for key in keys:
            value = node[key]
            if isinstance(value, str):
                if PREFIX in value and (kept := without_progress(value)) != value:
                    node[key] = kept
                    changed = True
            elif isinstance(value, dict | list):
                stack.append(value)
    return changed


def without_progress(text: str) -> str:
    """``text`` without swapd's progress lines, and without a ``<think>`` block that
    held nothing else."""
    if "<think>" in text:
        text = _THINK_OF_LINES.sub("", text)
    return _LINE.sub("", text)


def may_carry_progress(body: bytes) -> bool:
    """Cheap test on the raw body before paying for ``strip_progress``."""
    return _PREFIX_BYTES in body
