"""Ollama's native generation API, served by translating it to llama-server's routes.

``POST /api/chat``, ``/api/generate``, ``/api/embed`` and ``/api/embeddings`` are
rewritten (``translate``) into an OpenAI chat/completions/embeddings body (llama-server's
``/infill`` for a ``suffix``) and served by the same ``InferenceProxy`` as the OpenAI
routes: same queue, keys, metrics, fallbacks (an OpenAI-compatible fallback gets the
translated body), load progress. Only the answer differs: ``OllamaExchange`` decodes
the upstream's SSE or JSON (``Answer``, sans-IO) and writes Ollama's NDJSON lines or
JSON object, and every error as Ollama's ``{"error": "..."}``.

A waiting stream that asked for thinking (``think``) gets its 200 at once, like a chat
completion, and swapd's progress lines go in ``message.thinking``, with empty
``content`` lines as keep-alives. Any other waits as Ollama's own server makes it
wait: nothing sent until the answer, and an error as its status.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import attrs
import trio

from swapd.config import Fallback, Profile
from swapd.errors import LeaseError
from swapd.http.catalog import resolve_tagged
from swapd.http.fastpath import OLLAMA_POSTS, Exchange, RequestError
from swapd.http.proxy import InferenceProxy, encode_json, parse_json_object
from swapd.net.upstream import ChildResponse, HttpxResponse, UpstreamError

log = logging.getLogger(__name__)

NDJSON_HEADERS = [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache"),
                  (b"x-accel-buffering", b"no")]
_JSON_HEADERS = [(b"content-type", b"application/json; charset=utf-8")]

OPTION_NAMES = {
    "num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p",
    "top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p", "seed": "seed",
    "stop": "stop", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n", "mirostat": "mirostat", "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta", "num_keep": "n_keep",
}
"""Ollama's per-request ``options`` and the llama-server parameter each one sets."""

LOAD_TIME_OPTIONS = frozenset({
    "num_ctx", "num_gpu", "main_gpu", "num_thread", "num_batch", "use_mmap", "use_mlock",
    "low_vram", "f16_kv", "vocab_only", "numa", "num_gqa", "logits_all", "embedding_only",
    "rope_frequency_base", "rope_frequency_scale", "penalize_newline", "tfs_z",
})
"""Options llama-server sets when it starts, not per request: ignored, with a log line
(set them as the profile's flags)."""

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_IMAGE_TYPES = {"/9j/": "image/jpeg", "iVBOR": "image/png", "R0lGOD": "image/gif",
                "UklGR": "image/webp"}


class OllamaError(Exception):
    """A request refused in Ollama's words, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_json(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def not_found(model: str) -> OllamaError:
    return OllamaError(404, f'model "{model}" not found, try pulling it first')


# -- requests ---------------------------------------------------------------------------

@attrs.define
class Call:
    """An Ollama request, translated."""

    api: str  # /api/chat, /api/generate, /api/embed, /api/embeddings
    model: str  # as the client named it (answers echo it)
    path: str  # llama-server's route
    body: dict[str, Any]
    stream: bool
    think: bool  # progress may go in ``thinking``
    keep_alive: float | None = None  # seconds (math.inf: forever); None: not given
    dimensions: int | None = None
    load_only: bool = False  # no messages, no prompt: load (or unload) the model


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's ``keep_alive``: a number of seconds or a Go duration ("5m", "1h30m");
    negative means forever (math.inf)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise OllamaError(400, "keep_alive must be a duration like \"5m\" or seconds")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer past any float: forever, as -1 says
            seconds = math.inf
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise OllamaError(400, f"time: invalid duration {value!r} in keep_alive; "
                                  "use e.g. \"5m\", \"1h\", 300, 0 or -1") from None
            seconds = sign * sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        raise OllamaError(400, "keep_alive must be a duration like \"5m\" or seconds")
    if math.isnan(seconds):
        raise OllamaError(400, "keep_alive is not a number")
    return math.inf if seconds < 0 else seconds


def _options(options: Any, path: str) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise OllamaError(400, "options must be an object")
    out: dict[str, Any] = {}
    ignored = []
    for key, value in options.items():
        name = OPTION_NAMES.get(key)
        if name is None:
            ignored.append(key)
        elif key == "num_predict":
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                out[name] = value  # -1 (no limit), -2 (fill the context): llama's default
        elif value is not None:
            out[name] = value
    if ignored:
        log.info("%s: ignoring Ollama options %s (%s)", path, ", ".join(sorted(ignored)),
                 "set at load time: use the profile's flags" if set(ignored) <= (
                     LOAD_TIME_OPTIONS) else "not per-request options llama-server has")
    return out


def _think(value: Any, body: dict[str, Any]) -> bool:
    """``think``: true/false, or "low"/"medium"/"high"; whether progress may go there."""
    if value is None:
        return False
    if isinstance(value, bool):
        body["chat_template_kwargs"] = {"enable_thinking": value}
        return value
    if isinstance(value, str) and value in ("low", "medium", "high"):
        body["chat_template_kwargs"] = {"enable_thinking": True}
        body["reasoning_effort"] = value
        return True
    raise OllamaError(400, f"think must be true, false, \"low\", \"medium\" or \"high\", "
                      f"not {json.dumps(value)[:50]}")


def _format(value: Any, body: dict[str, Any], chat: bool) -> None:
    if value is None or value == "":
        return
    if value == "json":
        schema: dict[str, Any] = {"type": "object"}
        if chat:
            body["response_format"] = {"type": "json_object"}
            return
    elif isinstance(value, dict):
        schema = value
    else:
        raise OllamaError(400, f"invalid format: {json.dumps(value)[:80]}; use \"json\" or "
                          "a JSON schema object")
    if chat:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "format", "schema": schema}}
    else:
        body["json_schema"] = schema


def _image_part(image: Any) -> dict[str, Any]:
    if not isinstance(image, str):
        raise OllamaError(400, "images must be base64-encoded strings")
    if image.startswith("data:"):
        return {"type": "image_url", "image_url": {"url": image}}
    kind = next((t for magic, t in _IMAGE_TYPES.items() if image.startswith(magic)),
                "image/png")
    return {"type": "image_url", "image_url": {"url": f"data:{kind};base64,{image}"}}


def _content(text: str, images: Any) -> Any:
    if not images:
        return text
    if not isinstance(images, list):
        raise OllamaError(400, "images must be a list of base64-encoded strings")
    return [{"type": "text", "text": text}, *(_image_part(i) for i in images)]


def _messages(messages: Any) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's: images as parts, thinking as reasoning_content,
    tool calls with JSON-string arguments and ids the tool answers refer back to."""
    if not isinstance(messages, list):
        raise OllamaError(400, "messages must be a list of objects")
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (call id, function name) not yet answered
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise OllamaError(400, f"messages[{n}] must be an object with a role")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise OllamaError(400, f"messages[{n}].content must be a string")
        role = message["role"]
        item: dict[str, Any] = {"role": role, "content": _content(content,
                                                                   message.get("images"))}
        thinking = message.get("thinking")
        if isinstance(thinking, str) and thinking:
            item["reasoning_content"] = thinking
        calls = message.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise OllamaError(400, f"messages[{n}].tool_calls must be a list")
            item["tool_calls"] = []
            for k, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise OllamaError(400, f"messages[{n}].tool_calls[{k}] needs a function "
                                      "with a name")
                arguments = function.get("arguments", {})
                call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{n}_{k}"
                item["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": function["name"], "arguments": arguments if isinstance(
                        arguments, str) else json.dumps(arguments)}})
                pending.append((call_id, function["name"]))
        if role == "tool":
            name = message.get("tool_name") or message.get("name")
            match = next((p for p in pending if p[1] == name), pending[0] if pending else None)
            if match is not None:
                pending.remove(match)
                item["tool_call_id"] = match[0]
            if isinstance(name, str):
                item["name"] = name
        out.append(item)
    return out


def translate(api: str, payload: dict[str, Any]) -> Call:
    """An Ollama request as llama-server's; ``OllamaError`` (400) for bad input."""
    model = payload.get("model") or payload.get("name")
    if not model:
        raise OllamaError(400, "model is required")
    if not isinstance(model, str):
        raise OllamaError(400, "model must be a string")
    stream = payload.get("stream")
    stream = True if stream is None else stream  # Ollama streams unless told not to
    if not isinstance(stream, bool):
        raise OllamaError(400, "stream must be true or false")
    keep_alive = parse_keep_alive(payload.get("keep_alive"))
    body: dict[str, Any] = {"model": model}
    call = Call(api, model, "/v1/chat/completions", body, stream, False, keep_alive)
    if api == "/api/chat":
        messages = payload.get("messages")
        call.load_only = messages is None or messages == []
        body["messages"] = _messages([] if messages is None else messages)
        if payload.get("tools"):
            body["tools"] = payload["tools"]
        call.think = _think(payload.get("think"), body)
        _format(payload.get("format"), body, chat=True)
    elif api == "/api/generate":
        prompt = payload.get("prompt") or ""
        suffix = payload.get("suffix") or ""
        system = payload.get("system") or ""
        if not all(isinstance(v, str) for v in (prompt, suffix, system)):
            raise OllamaError(400, "prompt, suffix and system must be strings")
        for ignored in ("context", "template"):
            if payload.get(ignored):
                log.info("/api/generate: ignoring %r (not served by swapd)", ignored)
        call.load_only = not prompt and not suffix
        if suffix:
            call.path = "/infill"
            body.update(input_prefix=prompt, input_suffix=suffix, prompt="")
            _format(payload.get("format"), body, chat=False)
        elif payload.get("raw") is True:
            call.path = "/v1/completions"
            body["prompt"] = prompt
            _format(payload.get("format"), body, chat=False)
        else:
            turns: list[dict[str, Any]] = [{"role": "system", "content": system}] if (
                system) else []
            turns.append({"role": "user", "content": _content(prompt, payload.get("images"))})
            body["messages"] = turns
            call.think = _think(payload.get("think"), body)
            _format(payload.get("format"), body, chat=True)
    else:  # /api/embed, /api/embeddings (OLLAMA_POSTS: the only routes served here)
        call.path, call.stream = "/v1/embeddings", False
        key = "input" if api == "/api/embed" else "prompt"
        inputs = payload.get(key)
        if (isinstance(inputs, list) and not all(isinstance(i, str) for i in inputs)) or (
                inputs is not None and not isinstance(inputs, str | list)):
            raise OllamaError(400, f"{key} must be a string or a list of strings")
        call.load_only = not inputs
        body["input"] = inputs or ""
        if api == "/api/embeddings":
            body["embd_normalize"] = -1  # the old route's vectors are not normalized
        dimensions = payload.get("dimensions")
        if dimensions is not None:
            if not isinstance(dimensions, int) or isinstance(dimensions, bool) or (
                    dimensions < 1):
                raise OllamaError(400, "dimensions must be a positive integer")
            call.dimensions = dimensions
    if call.stream:  # never an embedding
        body["stream"] = True
        if call.path != "/infill":
            body["stream_options"] = {"include_usage": True}
    options = _options(payload.get("options"), api)  # checked on every route
    if call.path != "/v1/embeddings":  # nothing to sample in an embedding
        body.update(options)
    return call


# -- answers ----------------------------------------------------------------------------

def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(ms: Any) -> int:
    return int(ms * 1e6) if isinstance(ms, int | float) else 0


class Answer:
    """Builds Ollama's answer objects from llama-server's (or an OpenAI fallback's)
    chunks and answers; no I/O."""

    def __init__(self, call: Call, started: float) -> None:
        self.call = call
        self.started = started
        self.done_reason = "stop"
        self.timings: dict[str, Any] = {}
        self.usage: dict[str, Any] = {}
        self._tools: dict[int, dict[str, Any]] = {}

    def _base(self) -> dict[str, Any]:
        return {"model": self.call.model, "created_at": _now_iso()}

    def piece(self, content: str = "", thinking: str | None = None,
              tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        out = self._base()
        if self.call.api == "/api/chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            out["message"] = message
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        out["done"] = False
        return out

    def _note(self, obj: dict[str, Any]) -> None:
        if isinstance(obj.get("timings"), dict):
            self.timings = obj["timings"]
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        if "tokens_predicted" in obj:  # llama-server's own shape (/infill)
            self.usage = {"completion_tokens": obj.get("tokens_predicted"),
                          "prompt_tokens": obj.get("tokens_evaluated")}
        if obj.get("stop") is True and "stop_type" in obj:
            self.done_reason = "length" if obj["stop_type"] == "limit" else "stop"

    def _finish(self, reason: Any) -> None:
        if isinstance(reason, str):
            self.done_reason = "length" if reason == "length" else "stop"

    def event(self, obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The lines one upstream stream event makes (often one, sometimes none)."""
        self._note(obj)
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices[:1]:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict):  # chat
                    for call in delta.get("tool_calls") or ():
                        self._add_tool(call)
                    content = delta.get("content") or ""
                    thinking = delta.get("reasoning_content") or delta.get("reasoning")
                else:  # completions
                    content, thinking = choice.get("text") or "", None
                if content or thinking:
                    yield self.piece(content, thinking)
                self._finish(choice.get("finish_reason"))
        elif isinstance(obj.get("content"), str) and obj["content"]:
            yield self.piece(obj["content"])

    def _add_tool(self, call: Any) -> None:
        if not isinstance(call, dict):
            return
        index = call.get("index", len(self._tools))
        slot = self._tools.setdefault(index, {"name": "", "arguments": ""})
        function = call.get("function") or {}
        slot["name"] += function.get("name") or ""
        slot["arguments"] += function.get("arguments") or ""

    def tool_calls(self) -> list[dict[str, Any]]:
        calls = []
        for index in sorted(self._tools):
            slot = self._tools[index]
            calls.append({"function": {"index": index, "name": slot["name"],
                                       "arguments": _arguments(slot["arguments"])}})
        return calls

    def done(self) -> dict[str, Any]:
        """The last object: ``done: true``, why, and the timings in nanoseconds."""
        out = self.piece()
        del out["done"]
        out.update(done=True, done_reason=self.done_reason, **self.durations())
        return out

    def durations(self) -> dict[str, int]:
        total = int((trio.current_time() - self.started) * 1e9)
        prompt_ns = _ns(self.timings.get("prompt_ms"))
        eval_ns = _ns(self.timings.get("predicted_ms"))
        prompt_n = self.usage.get("prompt_tokens")
        if not isinstance(prompt_n, int):
            prompt_n = (self.timings.get("prompt_n") or 0) + (self.timings.get("cache_n") or 0)
        eval_n = self.usage.get("completion_tokens")
        if not isinstance(eval_n, int):
            eval_n = self.timings.get("predicted_n") or 0
        return {"total_duration": total,
                # What the request waited for its model (queue and load) and swapd's
                # own time: everything but llama-server's evaluation.
                "load_duration": max(0, total - prompt_ns - eval_ns),
                "prompt_eval_count": prompt_n, "prompt_eval_duration": prompt_ns,
                "eval_count": eval_n, "eval_duration": eval_ns}

    def whole(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed upstream answer as Ollama's one object."""
        self._note(obj)
        if self.call.path == "/v1/embeddings":
            return self._embeddings(obj)
        content, thinking, calls = "", None, list[dict[str, Any]]()
        choices = obj.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            message = choice.get("message")
            if isinstance(message, dict):
                content = message.get("content") or ""
                thinking = message.get("reasoning_content") or message.get("reasoning")
                for call in message.get("tool_calls") or ():
                    function = call.get("function") or {} if isinstance(call, dict) else {}
                    calls.append({"function": {"index": len(calls),
                                               "name": function.get("name", ""),
                                               "arguments": _arguments(
                                                   function.get("arguments"))}})
            else:
                content = choice.get("text") or ""
            self._finish(choice.get("finish_reason"))
        elif isinstance(obj.get("content"), str):
            content = obj["content"]
        out = self.piece(content, thinking, calls or None)
        del out["done"]
        out.update(done=True, done_reason=self.done_reason, **self.durations())
        return out

    def _embeddings(self, obj: dict[str, Any]) -> dict[str, Any]:
        data = obj.get("data")
        rows = sorted((d for d in data if isinstance(d, dict)), key=lambda d: d.get(
            "index", 0)) if isinstance(data, list) else []
        vectors = [_dims(d.get("embedding") or [], self.call.dimensions) for d in rows]
        if self.call.api == "/api/embeddings":
            return {"embedding": vectors[0] if vectors else []}
        times = self.durations()
        return {"model": self.call.model, "embeddings": vectors,
                "total_duration": times["total_duration"],
                "load_duration": times["load_duration"],
                "prompt_eval_count": times["prompt_eval_count"]}


def _arguments(text: Any) -> Any:
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text) if isinstance(text, str) and text.strip() else {}
    except ValueError:
        return {}  # a model's broken JSON: no arguments rather than a crash
    return value if isinstance(value, dict) else {}


def _dims(vector: list[float], dimensions: int | None) -> list[float]:
    """Ollama's ``dimensions``: the first N values, normalized again."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    cut = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in cut)) or 1.0
    return [v / norm for v in cut]


MAX_EVENT = 1024 * 1024
"""Bytes of one upstream SSE event held while it arrives, at most."""

_JUNK = (TypeError, ValueError, AttributeError, KeyError, OverflowError)
"""What an upstream's answer of an unexpected shape raises while it is translated."""


def sse_events(buffer: bytearray, data: bytes) -> Iterator[bytes | None]:
    """Feed SSE bytes; yield each complete ``data:`` payload, and None for a comment.

    Lines may end in CRLF or CR (a JSON payload holds no raw CR); an event past
    ``MAX_EVENT`` bytes is an ``UpstreamError``, not a buffer that grows without end.
    """
    buffer += data.replace(b"\r", b"")
    if len(buffer) > MAX_EVENT and buffer.find(b"\n\n") < 0:
        raise UpstreamError(f"it sent an event of over {MAX_EVENT} bytes")
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return
        block = bytes(buffer[:end])
        del buffer[:end + 2]
        payload = [line[5:].lstrip() for line in block.split(b"\n")
                   if line.startswith(b"data:")]
        if payload:
            yield b"\n".join(payload)
        elif block.startswith(b":"):
            yield None


def ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _error_message(body: bytes, status: int) -> str:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        text = body.decode(errors="replace").strip()
        return text[:500] or f"upstream answered {status}"
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if isinstance(error, str):
        return error
    return body.decode(errors="replace")[:500]


# -- the exchange -----------------------------------------------------------------------

@attrs.define(eq=False)
class OllamaExchange(Exchange):
    """An inference exchange that answers in Ollama's shapes.

    ``request.path`` is llama-server's route (what the proxy forwards and which progress
    shape it picks); ``route`` is the client's, for metrics.
    """

    call: Call | None = None
    answer: Answer | None = None
    _sse: bytearray = attrs.field(factory=bytearray)

    @property
    def route(self) -> str:
        return self.call.api if self.call is not None else self.request.path

    def streams_while_waiting(self) -> bool:
        """Only a request that thinks has a place for progress; the others wait as
        Ollama's own server makes them wait, with nothing sent, and get their error
        as a status."""
        return self.stream and self.call is not None and self.call.think

    def _answer(self) -> Answer:
        assert self.answer is not None
        return self.answer

    async def start(self, status: int, headers: Any, length: int | None = None,
                    body: bytes = b"") -> None:
        """The proxy's early 200 of a waiting stream (its only call): Ollama's NDJSON
        head instead of SSE's."""
        await Exchange.start(self, status, NDJSON_HEADERS, length, body)

    async def body_part(self, data: bytes) -> None:
        """swapd's own lines while the request waits (SSE from ``proxy``): progress in
        ``thinking`` if the request thinks, a keep-alive as an empty piece."""
        out = []
        for event in sse_events(self._sse, data):
            if event is None:
                out.append(ndjson(self._answer().piece()))
                continue
            try:
                chunk = json.loads(event)
                delta = chunk["choices"][0]["delta"]
            except (ValueError, LookupError, TypeError):
                continue
            thinking = delta.get("reasoning_content")
            if isinstance(thinking, str) and self.call is not None and self.call.think:
                out.append(ndjson(self._answer().piece("", thinking)))
        if out:
            await Exchange.body_part(self, b"".join(out))

    async def fail(self, status: int, message: str, type_: str = "", code: str = "",
                   retry_after: float | None = None) -> None:
        """Ollama's error: ``{"error": message}`` with the status, or as the stream's
        last line once its 200 is out."""
        if not self.headers_sent:
            headers = list(_JSON_HEADERS)
            if retry_after is not None:
                headers.append((b"retry-after", str(math.ceil(retry_after)).encode()))
            body = error_json(message)
            await Exchange.start(self, status, headers, length=len(body), body=body)
            self.complete = True
        elif self.chunked and self.keep_alive:
            await Exchange.end(self, ndjson({"error": message}))
        else:
            log.warning("%s", message)
            self.keep_alive = self.complete = False

    async def relay(self, response: ChildResponse | HttpxResponse, label: str) -> str | None:
        """The upstream's answer in Ollama's shape; what went wrong, if anything."""
        answer = self._answer()
        try:
            if response.status_code != 200:
                body = await response.aread()
                await self.fail(response.status_code, _error_message(body,
                                                                     response.status_code))
                return None
            if not self.stream:
                try:
                    obj = parse_json_object(await response.aread())
                    body = json.dumps(answer.whole(obj), ensure_ascii=False).encode()
                except RequestError:
                    return f"{label} answered something that is not a JSON object"
                except _JUNK as junk:
                    return f"{label} answered in a shape swapd cannot translate: {junk!r}"
                # Not started yet: only a stream that thinks starts early.
                await Exchange.start(self, 200, _JSON_HEADERS, length=len(body), body=body)
                self.complete = True
                return None
            if not self.headers_sent:
                await Exchange.start(self, 200, NDJSON_HEADERS)
            events = bytearray()
            ended = False
            while not ended:
                data = await response.next_data()
                ended = not data  # then what is left of the last event, if it was cut
                out = []
                for event in sse_events(events, data or b"\n\n"):
                    if event is None or event == b"[DONE]":
                        continue
                    try:
                        obj = json.loads(event)
                    except ValueError:
                        continue
                    if isinstance(obj, dict) and "error" in obj:
                        error = obj["error"]
                        await self.fail(500, str(error.get("message") if isinstance(
                            error, dict) else error))
                        return None
                    if isinstance(obj, dict):
                        try:
                            out += [ndjson(piece) for piece in answer.event(obj)]
                        except _JUNK as junk:
                            return f"{label} sent an event swapd cannot translate: {junk!r}"
                if out:
                    await Exchange.body_part(self, b"".join(out))
            try:
                calls = answer.tool_calls()
                last = ndjson(answer.piece("", None, calls)) if calls else b""
                last += ndjson(answer.done())
            except _JUNK as junk:
                return f"{label} answered in a shape swapd cannot translate: {junk!r}"
            await Exchange.end(self, last)
        except UpstreamError as error:
            return f"{label} stopped answering: {error}"
        finally:
            await response.aclose()
        return None


# -- serving ----------------------------------------------------------------------------

class OllamaApi:
    """Serves the Ollama routes through ``proxy``; hands every other exchange to it."""

    def __init__(self, proxy: InferenceProxy) -> None:
        self.proxy = proxy

    async def __call__(self, ex: Exchange) -> None:
        if ex.request.path not in OLLAMA_POSTS:
            await self.proxy(ex)
            return
        inner = OllamaExchange(ex.conn, ex.request, ex.body, started=ex.started)
        try:
            await self._serve(inner, ex.request.path)
        finally:
            ex.status, ex.complete, ex.keep_alive = inner.status, inner.complete, inner.keep_alive
            ex.first_byte, ex.headers_sent = inner.first_byte, inner.headers_sent

    async def _serve(self, ex: OllamaExchange, api: str) -> None:
        proxy = self.proxy
        try:
            call = translate(api, parse_json_object(ex.body))
        except (RequestError, OllamaError) as refused:
            await ex.fail(refused.status, str(refused))
            proxy.count(ex)
            return
        ex.call, ex.answer = call, Answer(call, ex.started)
        config = proxy.config
        name, resolved = resolve_tagged(config, call.model)
        if resolved is None:
            missing = not_found(call.model)
            await ex.fail(missing.status, str(missing))
            proxy.count(ex)
            return
        call.body["model"] = name
        profile = resolved.name if isinstance(resolved, Profile) else None
        if call.load_only:
            await self._load_only(ex, call, profile, resolved)
            proxy.count(ex)
            return
        ex.request = attrs.evolve(ex.request, path=call.path, query=b"")
        try:
            ex.body = encode_json(call.body)
        except RequestError as error:
            await ex.fail(error.status, str(error))
            proxy.count(ex)
            return
        await proxy(ex)
        if profile is not None and ex.status == 200:
            # As Ollama: each request sets the model's idle time; none given, the default
            # (here the profile's ttl), not what an earlier request asked for.
            await proxy.supervisor.keep_alive(profile, call.keep_alive)

    async def _load_only(self, ex: OllamaExchange, call: Call, profile: str | None,
                         resolved: Profile | Fallback) -> None:
        """No messages or prompt: Ollama's way to load a model (keep_alive 0: unload)."""
        sup = self.proxy.supervisor
        answer = ex._answer()
        reason = "load"
        if profile is not None and call.keep_alive == 0:
            reason = "unload"
            await sup.unload(profile)
        elif profile is not None:
            lease = None
            with ex.waiting():
                try:
                    lease = await sup.acquire(profile)
                except LeaseError as error:
                    await ex.fail(error.status, str(error), retry_after=error.retry_after)
                    return
            if lease is None:
                return  # the client left
            await sup.release(lease)
            await sup.keep_alive(profile, call.keep_alive)
        if call.path == "/v1/embeddings":
            body = answer.whole({"data": []})
        else:
            body = answer.piece()
            del body["done"]
            body.update(done=True, done_reason=reason)
        data = json.dumps(body).encode()
        await Exchange.start(ex, 200, _JSON_HEADERS, length=len(data), body=data)
        ex.complete = True
