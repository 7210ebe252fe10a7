"""Load progress on a waiting request's own SSE stream, in shapes no client chokes on.

What may go on the wire before the model's own stream (spec section 4):

* SSE comments (``: swapd loading qwen``): every parser ignores them, and they keep
  proxies and clients from timing out;
* complete ``chat.completion.chunk`` objects whose only payload is
  ``delta.reasoning_content``: clients show it as "thinking" and never as the answer.

Never named ``event:`` lines, never other JSON, never text in ``content``. Every progress
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


def error_event(message: str, type_: str, code: str) -> bytes:
    """The in-band error that ends a stream whose 200 was already sent."""
    return data({"error": {"message": message, "type": type_, "code": code}}) + DONE


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
    if state == "stopping" and active:
        return f"stopping {active} to load {profile}"
    ahead = sum(n for name, n in status["waiting"].items() if name != profile)
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
