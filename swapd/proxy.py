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
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import httpx
import trio

from . import progress
from .config import Config, Profile
from .errors import LeaseError, Unavailable, UnknownModel
from .supervisor import Lease, Supervisor

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
_DROP_RESPONSE = HOP_BY_HOP | {b"server", b"date"}

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


async def send_lease_error(send: Send, error: LeaseError) -> None:
    headers = []
    if error.retry_after is not None:
        headers.append((b"retry-after", str(math.ceil(error.retry_after)).encode()))
    await send_error(send, error.status, str(error), error.type, error.code, headers)


class InferenceProxy:
    """ASGI handler for inference POSTs; one instance serves every request."""

    def __init__(self, config: Config, supervisor: Supervisor) -> None:
        self.config = config
        self.supervisor = supervisor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await self._read_body(receive)
            if body is None:
                return  # the client left before it finished sending
            payload = _parse(body)
        except RequestError as error:
            await send_error(send, error.status, str(error), "invalid_request_error",
                             error.code)
            return
        if progress.may_carry_progress(body) and progress.strip_progress(payload):
            body = json.dumps(payload).encode()
        name = payload.get("model")
        resolved = self.config.resolve(name) if name is not None else None
        if name is not None and not isinstance(resolved, Profile):
            if resolved is None:
                await send_lease_error(send, UnknownModel(name, self.config.model_names()))
            else:  # a fallback upstream's name; the fallback chain is not wired in yet
                await send_lease_error(send, Unavailable(
                    f"model {name!r} is a fallback upstream, which this build cannot reach"))
            return
        profile_name = resolved.name if isinstance(resolved, Profile) else None
        stream = payload.get("stream") is True
        path = scope["path"]
        async with trio.open_nursery() as nursery:
            # Whoever finishes first cancels the other: the exchange or the client leaving.
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            if (stream and path.endswith("/chat/completions")
                    and not self.supervisor.serving(profile_name)):
                await self._exchange_with_progress(scope, send, body, profile_name,
                                                   name or "")
            else:
                await self._exchange(scope, send, body, profile_name, stream)
            nursery.cancel_scope.cancel()

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

    async def _exchange(self, scope: Scope, send: Send, body: bytes,
                        profile: str | None, stream: bool) -> None:
        try:
            lease = await self.supervisor.acquire(profile)
        except LeaseError as error:
            await send_lease_error(send, error)
            return
        try:
            await self._pipe(scope, send, body, lease, stream, headers_sent=False)
        finally:
            await self.supervisor.release(lease)

    async def _exchange_with_progress(self, scope: Scope, send: Send, body: bytes,
                                      profile: str | None, model: str) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        chunks = progress.ProgressStream(model)
        result: list[Lease | LeaseError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_progress, send, chunks, profile or model)
            try:
                result.append(await self.supervisor.acquire(profile))
            except LeaseError as error:
                result.append(error)
            nursery.cancel_scope.cancel()
        (outcome,) = result
        if isinstance(outcome, LeaseError):
            await send({"type": "http.response.body", "more_body": False, "body":
                        progress.error_event(str(outcome), outcome.type, outcome.code)})
            return
        try:
            await self._pipe(scope, send, body, outcome, stream=True, headers_sent=True)
        finally:
            await self.supervisor.release(outcome)

    async def _send_progress(self, send: Send, chunks: progress.ProgressStream,
                             profile: str) -> None:
        keepalive = self.config.progress.keepalive
        reasoning = self.config.progress.reasoning
        await send({"type": "http.response.body", "more_body": True,
                    "body": progress.comment(f"swapd loading {profile}")})
        while True:
            if reasoning:
                line = progress.describe(self.supervisor.status(), profile)
                chunk = chunks.reasoning(line)
                if chunk is not None:
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
            with trio.move_on_after(min(keepalive, 1.0) if reasoning else keepalive) as timer:
                await self.supervisor.wait_changed()
            if timer.cancelled_caught:
                await send({"type": "http.response.body", "more_body": True,
                            "body": progress.comment(f"swapd loading {profile}")})

    async def _pipe(self, scope: Scope, send: Send, body: bytes, lease: Lease,
                    stream: bool, headers_sent: bool) -> None:
        """Send the request to the child and its answer to the client, as it comes."""
        client = lease.proc.client
        target = scope["path"] + ("?" + scope["query_string"].decode()
                                  if scope.get("query_string") else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _DROP_REQUEST]
        request = client.build_request(scope["method"], target, content=body, headers=headers)
        failure: str | None = None
        with lease.scope:
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as error:
                failure = f"model {lease.profile.name!r} did not answer: {error!r}"
            else:
                try:
                    if not headers_sent:
                        await send({"type": "http.response.start",
                                    "status": response.status_code,
                                    "headers": [(k, v) for k, v in response.headers.raw
                                                if k.lower() not in _DROP_RESPONSE]})
                        headers_sent = True
                    elif response.status_code != 200:
                        text = (await response.aread()).decode(errors="replace")
                        failure = f"model {lease.profile.name!r} answered " \
                                  f"{response.status_code}: {text[:500]}"
                    if failure is None:
                        async for chunk in response.aiter_raw():
                            await send({"type": "http.response.body", "body": chunk,
                                        "more_body": True})
                except httpx.HTTPError as error:
                    failure = f"model {lease.profile.name!r} stopped answering: {error!r}"
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await response.aclose()
        if lease.scope.cancelled_caught:
            failure = lease.revoked_because or f"model {lease.profile.name!r} went away"
        if failure is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif not headers_sent:
            await send_error(send, 502, failure, "server_error", "model_failed")
        elif stream:
            await send({"type": "http.response.body", "more_body": False,
                        "body": progress.error_event(failure, "server_error", "model_failed")})
        else:  # a plain body was half sent: all we can do is end it
            log.warning("%s", failure)
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _parse(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError as error:
        raise RequestError(400, f"request body is not valid JSON: {error}",
                           "invalid_json") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "request body must be a JSON object", "invalid_json")
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
