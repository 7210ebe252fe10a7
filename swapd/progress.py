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
line starts with ``PREFIX``, so it can be stripped from the assistant messages a client
sends back in the next turn (``strip_progress``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

PREFIX = "[swapd] "
_PREFIX_BYTES = PREFIX.strip().encode()

DONE = b"data: [DONE]\n\n"


def comment(text: str) -> bytes:
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


def data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class ProgressStream:
    """Builds the progress chunks of one waiting request (one id, one ``created``)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = "chatcmpl-swapd-" + uuid.uuid4().hex[:16]
        self.created = int(time.time())
        self._last_text = ""

    def reasoning(self, text: str) -> bytes | None:
        """A chunk saying ``text`` as reasoning, or None if it says nothing new."""
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
                "delta": {"role": "assistant", "reasoning_content": PREFIX + text + "\n"},
                "finish_reason": None,
            }],
        })


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
        code = error.get("code")
        return event("error", {"type": "error", "code": code if code is not None else
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
        if expected:
            percent = min(99, int(100 * elapsed / expected))
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
    if active and state in ("ready", "starting"):
        doing = "serving other requests" if state == "ready" else "loading for other requests"
        return f"queued for {profile}: {active} is {doing} ({ahead} waiting ahead)"
    return f"queued for {profile}"


def strip_progress(payload: dict[str, Any]) -> bool:
    """Remove swapd's progress lines from assistant messages sent back; True if changed."""
    changed = False
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return False  # not a chat body: nothing of swapd's to strip
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        for key in ("reasoning_content", "reasoning"):
            value = message.get(key)
            if isinstance(value, str) and PREFIX in value:
                kept = "\n".join(line for line in value.split("\n")
                                 if not line.startswith(PREFIX)).strip("\n")
                if kept:
                    message[key] = kept
                else:
                    del message[key]
                changed = True
    return changed


def may_carry_progress(body: bytes) -> bool:
    """Cheap test on the raw body before paying for ``strip_progress``."""
    return _PREFIX_BYTES in body
