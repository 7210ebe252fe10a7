"""The inference hot path: POSTs under ``/v1/`` routed by their JSON ``model``.

This is plain ASGI, not a Quart route: it runs for every token a client reads, and
Quart's request/response machinery costs more per request than everything else swapd
does (see ``bench/README.md``). It reads the body once, asks the supervisor for a lease
on the model, and pipes llama-server's answer back chunk by chunk without buffering.

A streaming chat request that has to wait for a load gets its 200 at once and progress
on its own stream (``progress``); everything else simply waits within
``timeouts.queue_wait``. A client that goes away cancels its upstream request and leaves
the queue; the load it caused goes on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any
from urllib.parse import quote, quote_from_bytes

import attrs
import httpx
import trio

from . import progress
from .config import Config, Fallback, Profile
from .errors import CircuitOpen, LeaseError, LocalFailed, UnknownModel
from .fallback import RETRY_NEXT, FallbackChain, describe
from .metrics import Metrics
from .supervisor import Lease, Supervisor
from .upstream import ChildResponse, HttpxResponse, UpstreamError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
# Never forwarded to the child: hop-by-hop, what httpx sets itself, and credentials.
_DROP_REQUEST = HOP_BY_HOP | {b"host", b"content-length", b"authorization", b"x-api-key",
                              b"accept-encoding"}
_DROP_RESPONSE = HOP_BY_HOP | {b"server"}

NATIVE_POSTS = frozenset({
    "/completion", "/completions", "/chat/completions", "/infill", "/embedding",
    "/embeddings", "/rerank", "/reranking", "/tokenize", "/detokenize", "/apply-template",
})
"""llama-server's own routes outside /v1/ (editor plugins use /infill): proxied too."""

KNOWN_ROUTES = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/messages", "/v1/rerank", "/v1/reranking", "/v1/audio/transcriptions",
}) | NATIVE_POSTS
"""Routes counted under their own label; anything else is "/v1/(other)"."""

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class RequestError(Exception):
    """A request swapd refuses before any upstream is involved (400, 413)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


async def send_error(send: Send, status: int, message: str, type_: str, code: str,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = error_body(message, type_, code)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})


class InferenceProxy:
    """ASGI handler for inference POSTs; one instance serves every request."""

    def __init__(self, supervisor: Supervisor, fallbacks: FallbackChain | None = None,
                 metrics: Metrics | None = None) -> None:
        self.supervisor = supervisor
        self.fallbacks = fallbacks or FallbackChain(())
        self.metrics = metrics or Metrics(supervisor)

    @property
    def config(self) -> Config:
        return self.supervisor.config  # the current one, across reloads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = _Exchange(scope, send)
        try:
            await self._handle(ex, receive)
        finally:
            self._count(ex)

    async def _handle(self, ex: _Exchange, receive: Receive) -> None:
        try:
            body = await self._read_body(receive)
            if body is None:
                return  # the client left before it finished sending
            payload = _parse(body)
            if progress.may_carry_progress(body) and progress.strip_progress(payload):
                body = encode_json(payload)
        except RequestError as error:
            await ex.fail(error.status, str(error), "invalid_request_error", error.code)
            return
        ex.body, ex.payload, ex.stream = body, payload, payload.get("stream") is True
        name = payload.get("model")
        ex.label = self.metrics.model_label(name)
        resolved = self.config.resolve(name) if name is not None else None
        if name is not None and resolved is None:
            unknown = UnknownModel(name, self.config.model_names())
            await ex.fail(unknown.status, str(unknown), unknown.type, unknown.code)
            return
        async with trio.open_nursery() as nursery:
            # Whoever finishes first cancels the other: the exchange or the client leaving.
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            if isinstance(resolved, Fallback):
                await self._remote(ex, [resolved], reason=None)
            else:
                profile = resolved.name if isinstance(resolved, Profile) else None
                await self._local(ex, profile, name or "")
            nursery.cancel_scope.cancel()

    def _count(self, ex: _Exchange) -> None:
        path = str(ex.scope["path"])
        route = path if path in KNOWN_ROUTES else "/v1/(other)"
        self.metrics.requests.labels(ex.label, route, str(ex.status or 499)).inc()
        if ex.first_byte is not None:
            self.metrics.first_byte.labels(ex.label).observe(ex.first_byte - ex.started)

    async def _read_body(self, receive: Receive) -> bytes | None:
        limit = self.config.security.max_body
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is larger than {limit} bytes "
                                   "(security.max_body)", "body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _local(self, ex: _Exchange, profile: str | None, model: str) -> None:
        """Serve from the local model, with progress if a streaming chat must wait."""
        if (ex.stream and ex.scope["path"].endswith("/chat/completions")
                and not self.supervisor.serving(profile)):
            await ex.start(200, SSE_HEADERS)
            lease = await self._acquire_with_progress(ex, profile, model)
        else:
            try:
                lease = await self.supervisor.acquire(profile)
            except LeaseError as error:
                lease = error
        self.metrics.queue_wait.labels(ex.label).observe(trio.current_time() - ex.started)
        if isinstance(lease, LeaseError):
            if isinstance(lease, LocalFailed | CircuitOpen) and self.fallbacks:
                await self._remote(ex, self.fallbacks.fallbacks, reason=str(lease))
            else:
                await ex.fail(lease.status, str(lease), lease.type, lease.code,
                              retry_after=lease.retry_after)
            return
        try:
            failure: str | None = None
            with lease.scope:
                try:
                    response = await lease.proc.pool.request(
                        ex.scope["method"], _target(ex.scope),
                        forwardable(ex.scope["headers"], _DROP_REQUEST), ex.body)
                except UpstreamError as error:
                    failure = f"model {lease.profile.name!r} did not answer: {error}"
                else:
                    failure = await ex.relay(response, lease.profile.name)
            if lease.scope.cancelled_caught:
                failure = lease.revoked_because or f"model {lease.profile.name!r} went away"
            if failure is not None:
                await ex.fail(502, failure, "server_error", "model_failed")
        finally:
            await self.supervisor.release(lease)

    async def _acquire_with_progress(self, ex: _Exchange, profile: str | None,
                                     model: str) -> Lease | LeaseError:
        chunks = progress.ProgressStream(model)
        result: list[Lease | LeaseError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_progress, ex, chunks, profile or model)
            try:
                result.append(await self.supervisor.acquire(profile))
            except LeaseError as error:
                result.append(error)
            nursery.cancel_scope.cancel()
        if isinstance(result[0], LocalFailed | CircuitOpen) and self.fallbacks:
            line = chunks.reasoning(f"{model} can't start here; trying the fallbacks")
            if line is not None and self.config.progress.reasoning:
                await ex.body_part(line)
        return result[0]

    async def _send_progress(self, ex: _Exchange, chunks: progress.ProgressStream,
                             profile: str) -> None:
        keepalive = self.config.progress.keepalive
        reasoning = self.config.progress.reasoning
        await ex.body_part(progress.comment(f"swapd loading {profile}"))
        while True:
            changed = self.supervisor.next_change()  # before the send, so none is missed
            if reasoning:
                chunk = chunks.reasoning(progress.describe(self.supervisor.status(), profile))
                if chunk is not None:
                    await ex.body_part(chunk)
            with trio.move_on_after(min(keepalive, 1.0) if reasoning else keepalive) as timer:
                await changed.wait()
            if timer.cancelled_caught:
                await ex.body_part(progress.comment(f"swapd loading {profile}"))

    async def _remote(self, ex: _Exchange, fallbacks: Sequence[Fallback],
                      reason: str | None) -> None:
        """Serve from the first fallback that works; 503 naming each one tried if none."""
        tried: list[str] = []
        for fallback in fallbacks:
            problem = await self.fallbacks.problem(fallback)
            if problem is not None:
                tried.append(f"{fallback.name}: {problem}")
                self.metrics.fallback.labels(fallback.name, "unavailable").inc()
                continue
            try:
                response = HttpxResponse(await self.fallbacks.open_response(
                    fallback, _quoted_path(ex.scope), ex.payload))
            except RecursionError:  # parsed, but too deep to encode again from here
                await ex.fail(400, "request body is JSON nested too deeply to forward",
                              "invalid_request_error", "invalid_json")
                return
            except httpx.HTTPError as error:
                problem = f"{type(error).__name__}: {error}"
                self.fallbacks.mark_down(fallback, problem)
                tried.append(f"{fallback.name}: {problem}")
                continue
            if response.status_code >= 500 or response.status_code in RETRY_NEXT:
                text = (await response.aread())[:300].decode(errors="replace")
                await response.aclose()
                tried.append(f"{fallback.name}: answered {response.status_code} {text}")
                self.metrics.fallback.labels(fallback.name, "refused").inc()
                continue
            log.info("serving %r from fallback %s%s", ex.payload.get("model"), fallback.name,
                     f" ({reason.splitlines()[0]})" if reason else "")
            self.fallbacks.used[fallback.name] = self.fallbacks.used.get(fallback.name, 0) + 1
            self.metrics.fallback.labels(fallback.name, "served").inc()
            failure = await ex.relay(response, f"fallback {fallback.name}")
            if failure is not None:
                await ex.fail(502, failure, "server_error", "upstream_failed")
            return
        local = f"{reason}; " if reason else ""
        await ex.fail(503, f"{local}fallbacks tried: {describe(tried)}", "server_error",
                      "unavailable")


@attrs.define
class _Exchange:
    """One client request and what has been sent back for it so far."""

    scope: Scope
    send: Send
    body: bytes = b""
    payload: dict[str, Any] = attrs.field(factory=dict)
    stream: bool = False
    label: str = "(none)"  # the request's model as a metrics label; "(none)" if unparsed
    headers_sent: bool = False
    status: int = 0
    started: float = attrs.field(factory=trio.current_time)
    first_byte: float | None = None

    async def start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.status = status
        await self.send({"type": "http.response.start", "status": status,
                         "headers": list(headers)})
        self.headers_sent = True

    async def body_part(self, data: bytes, more: bool = True) -> None:
        if self.first_byte is None and data:
            self.first_byte = trio.current_time()
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def relay(self, response: ChildResponse | HttpxResponse, label: str) -> str | None:
        """Pipe an upstream's answer as it comes; return what went wrong, if anything."""
        failure: str | None = None
        try:
            if not self.headers_sent:
                await self.start(response.status_code,
                                 forwardable(response.raw_headers, _DROP_RESPONSE))
            elif response.status_code != 200:  # our 200 is out: say it in-band
                text = (await response.aread()).decode(errors="replace")
                return f"{label} answered {response.status_code}: {text[:500]}"
            # One chunk is held back so the last goes out with the end of the body:
            # one send fewer per answer.
            held: bytes | None = None
            async for chunk in response.aiter_raw():
                if held is not None:
                    await self.body_part(held)
                held = chunk
            await self.body_part(held or b"", more=False)
        except UpstreamError as error:
            failure = f"{label} stopped answering: {error}"
        finally:
            await response.aclose()
        return failure

    async def fail(self, status: int, message: str, type_: str, code: str,
                   retry_after: float | None = None) -> None:
        """End the exchange with an error, in whatever form is still possible."""
        if not self.headers_sent:
            headers = []
            if retry_after is not None:
                headers.append((b"retry-after", str(math.ceil(retry_after)).encode()))
            self.status = status
            await send_error(self.send, status, message, type_, code, headers)
        elif self.stream:
            await self.send({"type": "http.response.body", "more_body": False,
                             "body": progress.error_event(message, type_, code)})
        else:  # a plain body was half sent: all we can do is end it
            log.warning("%s", message)
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})


def forwardable(headers: Iterable[tuple[bytes, bytes]],
                drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """``headers`` less ``drop`` and less any header the Connection header names."""
    headers = list(headers)
    named = {token.strip().lower() for name, value in headers if name.lower() == b"connection"
             for token in value.split(b",")}
    return [(k, v) for k, v in headers if k.lower() not in drop and k.lower() not in named]


_PATH_SAFE = "/:@!$&'()*+,;=-._~"
"""What stays as it is in a forwarded path (RFC 3986 pchar); the rest is %-encoded."""
_QUERY_SAFE = bytes(range(0x21, 0x7F)).replace(b"#", b"")
"""What stays as it is in a forwarded query: printable ASCII but '#' (existing %XX too)."""


def _quoted_path(scope: Scope) -> str:
    """The path swapd decided on, encoded again for a request line.

    The front end hands over the path percent-decoded: forwarding it as it is would let a
    decoded '?' or '#' move the path's end, a '%' start an escape, and a non-ASCII
    character fail the upstream request.
    """
    return quote(str(scope["path"]), safe=_PATH_SAFE)


def _target(scope: Scope) -> str:
    """The upstream request target: nothing in it can end the request line early."""
    query = scope.get("query_string")
    return _quoted_path(scope) + ("?" + quote_from_bytes(query, safe=_QUERY_SAFE)
                                  if query else "")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """``body`` as a JSON object; a 400 ``invalid_json`` for anything else.

    JSON nested deeper than Python's recursion limit raises RecursionError, not
    ValueError: that too is the client's malformed body, not swapd's failure.
    """
    try:
        payload = json.loads(body)
    except ValueError as error:
        raise RequestError(400, f"request body is not valid JSON: {error}",
                           "invalid_json") from None
    except RecursionError:
        raise RequestError(400, "request body is JSON nested too deeply to read",
                           "invalid_json") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "request body must be a JSON object, not "
                           f"{_json_kind(payload)}", "invalid_json")
    return payload


def encode_json(payload: dict[str, Any]) -> bytes:
    """``payload`` as JSON again; a 400 if it nests too deeply to write from here."""
    try:
        return json.dumps(payload).encode()
    except RecursionError:
        raise RequestError(400, "request body is JSON nested too deeply to forward",
                           "invalid_json") from None


def _json_kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _parse(body: bytes) -> dict[str, Any]:
    payload = parse_json_object(body)
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "'model' must be a string", "invalid_model")
    if model == "":
        payload.pop("model")
    return payload


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
