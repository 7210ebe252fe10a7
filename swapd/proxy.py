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
from functools import partial
from typing import Any
from urllib.parse import quote, quote_from_bytes

import attrs
import httpx
import trio

from . import progress
from .config import Config, Fallback, Profile
from .errors import CircuitOpen, LeaseError, LocalFailed, UnknownModel, WontFit
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
    """A request swapd refuses before any upstream is involved (400, 408, 413, 503)."""

    def __init__(self, status: int, message: str, code: str, *,
                 type_: str = "invalid_request_error", retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.type = type_
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None:
            return []
        return [(b"retry-after", str(self.retry_after).encode())]


class BodyReader:
    """Reads request bodies within ``timeouts.body`` and a memory budget shared by all
    requests (``security.max_pending_bodies``).

    Without both, clients that send their headers and then stall each hold a task and
    up to ``max_body`` of memory for as long as they like. A declared Content-Length is
    reserved up front, so a body that could never fit is refused before it is read; a
    chunked body reserves as it grows. What is reserved is given back once the body is
    complete (or refused): only bodies still arriving count.
    """

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self.pending = 0
        """Bytes reserved by the bodies being received now."""

    async def read(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None if the client left; raises ``RequestError``: 413 too
        large, 408 not complete within ``timeouts.body``, 503 over the shared budget."""
        config = self._config()
        limit = config.security.max_body
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise _too_large(limit)
        reserved = 0
        try:
            reserved = self._reserve(declared or 0, reserved, config)
            chunks = []
            size = 0
            with trio.fail_after(config.timeouts.body):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    if size > reserved:
                        reserved = self._reserve(size, reserved, config)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except trio.TooSlowError:
            raise RequestError(408, "the request body did not arrive within "
                               f"{config.timeouts.body:g}s (timeouts.body)",
                               "body_timeout") from None
        finally:
            self.pending -= reserved

    def _reserve(self, size: int, reserved: int, config: Config) -> int:
        """Grow one body's reservation from ``reserved`` to ``size`` bytes, or refuse."""
        budget = config.security.pending_bodies_limit
        if self.pending + size - reserved > budget:
            raise RequestError(
                503, f"swapd is receiving {self.pending} bytes of other request bodies and "
                f"this one would pass security.max_pending_bodies ({budget} bytes); retry",
                "server_busy", type_="server_error", retry_after=BUSY_RETRY_AFTER)
        self.pending += size - reserved
        return size


BUSY_RETRY_AFTER = 1
"""Retry-After (seconds) of a 503 for a body over ``security.max_pending_bodies``."""


def _too_large(limit: int) -> RequestError:
    return RequestError(413, f"request body is larger than {limit} bytes "
                        "(security.max_body)", "body_too_large")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses these before they get here
    return None


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` (already read) once, then the real messages."""
    first: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return first.pop() if first else await receive()

    return replayed


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
        self.bodies = BodyReader(lambda: self.config)

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
            body = await self.bodies.read(ex.scope, receive)
            if body is None:
                return  # the client left before it finished sending
            payload = _parse(body)
            if progress.may_carry_progress(body) and progress.strip_progress(payload):
                body = encode_json(payload)
        except RequestError as error:
            await ex.fail(error.status, str(error), error.type, error.code,
                          retry_after=error.retry_after)
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
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope,
                               partial(self._abandon, ex))
            if isinstance(resolved, Fallback):
                await self._remote(ex, [resolved], reason=None)
            else:
                profile = resolved.name if isinstance(resolved, Profile) else None
                await self._local(ex, profile, name or "")
            nursery.cancel_scope.cancel()

    async def _abandon(self, ex: _Exchange) -> None:
        """The client left: close the upstream and hand the lease back now.

        The exchange is cancelled too, but a send to the client may be stuck where no
        cancel reaches (hypercorn shields its socket writes; ``timeouts.send`` ends
        those): the model must not stay leased, nor keep generating, until then.
        Hypercorn also reports a disconnect once an answer is complete: then the
        exchange ends by itself, and its connection goes back to the pool.
        """
        if ex.upstream is not None and ex.upstream.complete:
            return
        if ex.upstream is not None:
            ex.upstream.abort()
        if ex.lease is not None:
            await self.supervisor.release(ex.lease)

    def _count(self, ex: _Exchange) -> None:
        path = str(ex.scope["path"])
        route = path if path in KNOWN_ROUTES else "/v1/(other)"
        self.metrics.requests.labels(ex.label, route, str(ex.status or 499)).inc()
        if ex.first_byte is not None:
            self.metrics.first_byte.labels(ex.label).observe(ex.first_byte - ex.started)

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
            if isinstance(lease, LocalFailed | CircuitOpen | WontFit) and self.fallbacks:
                await self._remote(ex, self.fallbacks.fallbacks, reason=str(lease))
            else:
                await ex.fail(lease.status, str(lease), lease.type, lease.code,
                              retry_after=lease.retry_after)
            return
        ex.lease = lease
        try:
            failure: str | None = None
            first_byte, idle = self.config.answer_timeouts(lease.profile)
            with lease.scope:
                try:
                    response = await lease.proc.pool.request(
                        ex.scope["method"], _target(ex.scope),
                        forwardable(ex.scope["headers"], _DROP_REQUEST), ex.body,
                        first_byte_timeout=first_byte, idle_timeout=idle)
                except UpstreamError as error:
                    failure = f"model {lease.profile.name!r} did not answer: {error}"
                else:
                    ex.upstream = response
                    failure = await ex.relay(response, lease.profile.name)
            if lease.scope.cancelled_caught:
                failure = lease.revoked_because or f"model {lease.profile.name!r} went away"
            if failure is not None:
                await ex.fail(502, failure, "server_error", "model_failed")
        finally:
            ex.lease = ex.upstream = None
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
        if isinstance(result[0], LocalFailed | CircuitOpen | WontFit) and self.fallbacks:
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
    lease: Lease | None = None  # while it holds one
    upstream: ChildResponse | None = None  # the child's answer, while it is relayed

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


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope,
                                abandon: Callable[[], Awaitable[None]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            await abandon()
            return
