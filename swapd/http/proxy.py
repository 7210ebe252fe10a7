"""Inference requests: routed by their JSON ``model`` to the local model or a fallback.

The fast path (``fastpath.py``) reads each request and hands it here as an
``Exchange``; this module asks the supervisor for a lease on the model, and relays
llama-server's answer back as it comes, without buffering.

A streaming chat request that has to wait for a load gets its 200 at once and progress
on its own stream (``progress``); everything else simply waits within
``timeouts.queue_wait``. A client that goes away cancels its upstream request and leaves
the queue; the load it caused goes on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, quote_from_bytes

import httpx
import trio
from prometheus_client import Counter, Histogram

from swapd.config import Config, Fallback, Profile
from swapd.core import Lease, Supervisor
from swapd.errors import CircuitOpen, LeaseError, LocalFailed, UnknownModel, WontFit
from swapd.http import progress
from swapd.http.fallback import RETRY_NEXT, FallbackChain, describe
from swapd.http.fastpath import (
    HOP_BY_HOP,
    NATIVE_POSTS,
    OLLAMA_POSTS,
    Exchange,
    RequestError,
    forwardable,
)
from swapd.net.upstream import HttpxResponse, UpstreamError
from swapd.observe.metrics import Metrics

log = logging.getLogger(__name__)

# Never forwarded to the child: hop-by-hop, what the client pool sets itself, and
# credentials.
_DROP_REQUEST = HOP_BY_HOP | {b"host", b"content-length", b"authorization", b"x-api-key",
                              b"accept-encoding", b"expect"}

KNOWN_ROUTES = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/messages", "/v1/rerank", "/v1/reranking", "/v1/audio/transcriptions",
}) | NATIVE_POSTS | OLLAMA_POSTS
"""Routes counted under their own label; anything else is "/v1/(other)"."""

PROGRESS_REFRESH = 1.0
"""Seconds between looks at a waiting request's progress line (its ETA moves)."""

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class InferenceProxy:
    """Serves inference exchanges; one instance serves every request."""

    def __init__(self, supervisor: Supervisor, fallbacks: FallbackChain | None = None,
                 metrics: Metrics | None = None) -> None:
        self.supervisor = supervisor
        self.fallbacks = fallbacks or FallbackChain(())
        self.metrics = metrics or Metrics(supervisor)
        self._counters: dict[tuple[str, str, int], Counter] = {}
        self._histograms: dict[tuple[Histogram, str], Histogram] = {}

    @property
    def config(self) -> Config:
        return self.supervisor.config  # the current one, across reloads

    async def __call__(self, ex: Exchange) -> None:
        try:
            await self._handle(ex)
        finally:
            self.count(ex)

    async def _handle(self, ex: Exchange) -> None:
        try:
            payload = _parse(ex.body)
            if progress.may_carry_progress(ex.body) and progress.strip_progress(payload):
                ex.body = encode_json(payload)
        except RequestError as error:
            await ex.fail(error.status, str(error), error.type, error.code,
                          retry_after=error.retry_after)
            return
        ex.payload, ex.stream = payload, payload.get("stream") is True
        ex.shape = progress.shape_for(ex.request.path) or ex.shape  # errors in its own shape
        name = payload.get("model")
        ex.label = self.metrics.model_label(name)
        resolved = self.config.resolve(name) if name is not None else None
        if name is not None and resolved is None:
            unknown = UnknownModel(name, self.config.model_names())
            await ex.fail(unknown.status, str(unknown), unknown.type, unknown.code)
        elif isinstance(resolved, Fallback):
            await self._remote(ex, [resolved], reason=None)
        else:
            profile = resolved.name if isinstance(resolved, Profile) else None
            await self._local(ex, profile, name or "")

    def count(self, ex: Exchange) -> None:
        """Count the request; the metric children are looked up once per label set."""
        key = (ex.label, ex.route, ex.status or 499)
        counter = self._counters.get(key)
        if counter is None:
            route = key[1] if key[1] in KNOWN_ROUTES else "/v1/(other)"
            counter = self._counters[key] = self.metrics.requests.labels(
                ex.label, route, str(key[2]))
        counter.inc()
        if ex.first_byte is not None:
            self._per_model(self.metrics.first_byte, ex.label).observe(
                ex.first_byte - ex.started)

    def _per_model(self, histogram: Histogram, label: str) -> Histogram:
        """``histogram.labels(label)``, looked up once per model."""
        child = self._histograms.get((histogram, label))
        if child is None:
            child = self._histograms[histogram, label] = histogram.labels(label)
        return child

    async def _local(self, ex: Exchange, profile: str | None, model: str) -> None:
        """Serve from the local model, with progress if a streaming chat must wait."""
        lease: Lease | LeaseError | None = self.supervisor.lease_now(profile)
        if lease is None:
            lease = self.supervisor.refusal(profile)  # refused now: before any early 200
        if lease is None:
            with ex.waiting():  # the client leaving ends the wait, and its place in line
                if ex.streams_while_waiting():
                    await ex.start(200, SSE_HEADERS)
                    lease = await self._acquire_with_progress(ex, profile, model)
                else:
                    try:
                        lease = await self.supervisor.acquire(profile)
                    except LeaseError as error:
                        lease = error
            if lease is None:
                return  # the client left
        self._per_model(self.metrics.queue_wait, ex.label).observe(
            trio.current_time() - ex.started)
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
                        ex.request.method, _target(ex.request.path, ex.request.query),
                        forwardable(ex.request.headers, _DROP_REQUEST), ex.body,
                        first_byte_timeout=first_byte, idle_timeout=idle, on_wait=ex.watch)
                except UpstreamError as error:
                    failure = f"model {lease.profile.name!r} did not answer: {error}"
                else:
                    failure = await ex.relay(response, lease.profile.name)
            if lease.scope.cancelled_caught:
                failure = lease.revoked_because or f"model {lease.profile.name!r} went away"
            if failure is not None:
                await ex.fail(502, failure, "server_error", "model_failed")
        finally:
            ex.lease = None
            await self.supervisor.release(lease)

    async def _acquire_with_progress(self, ex: Exchange, profile: str | None,
                                     model: str) -> Lease | LeaseError:
        chunks = progress.ProgressStream(model)
        result: list[Lease | LeaseError] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_progress, ex, chunks, profile or model)
                try:
                    result.append(await self.supervisor.acquire(profile))
                except LeaseError as error:
                    result.append(error)
                nursery.cancel_scope.cancel()
            # The last line is said here, not by the progress task (cancelled as soon
            # as the lease came, its last line could be lost).
            if isinstance(result[0], Lease):
                line = f"{result[0].profile.name} is ready"
            elif isinstance(result[0], LocalFailed | CircuitOpen | WontFit) and self.fallbacks:
                line = f"{model} can't start here; trying the fallbacks"
            else:
                line = None
            if line is not None and self._shows_progress(ex):
                await _say(ex, chunks, line)
        except BaseException:  # a progress write failed (the client left) or a cancel
            if result and isinstance(result[0], Lease):  # not yet the caller's to return
                await self.supervisor.release(result[0])
            raise
        return result[0]

    def _shows_progress(self, ex: Exchange) -> bool:
        """Progress lines go on this stream (the setting, and a place in its API)."""
        return self.config.progress.reasoning and ex.shape.progress

    async def _send_progress(self, ex: Exchange, chunks: progress.ProgressStream,
                             profile: str) -> None:
        keepalive = self.config.progress.keepalive
        reasoning = self._shows_progress(ex)
        await ex.body_part(ex.shape.keepalive(profile))
        sent = trio.current_time()  # the last byte on the stream
        while True:
            changed = self.supervisor.next_change()  # before the send, so none is missed
            if reasoning and await _say(
                    ex, chunks, progress.describe(self.supervisor.status(), profile)):
                sent = trio.current_time()
            # Each second the line is looked at again (its ETA moves); a keep-alive only
            # when the stream has been silent for progress.keepalive.
            wake = sent + keepalive
            with trio.move_on_at(min(wake, trio.current_time() + PROGRESS_REFRESH)
                                 if reasoning else wake):
                await changed.wait()
            if trio.current_time() >= sent + keepalive:
                await ex.body_part(ex.shape.keepalive(profile))
                sent = trio.current_time()

    async def _remote(self, ex: Exchange, fallbacks: Sequence[Fallback],
                      reason: str | None) -> None:
        """Serve from the first fallback that works; 503 naming each one tried if none."""
        with ex.waiting():  # remote answers take their time: the client may leave
            await self._try_fallbacks(ex, fallbacks, reason)

    async def _try_fallbacks(self, ex: Exchange, fallbacks: Sequence[Fallback],
                             reason: str | None) -> None:
        tried: list[str] = []
        for fallback in fallbacks:
            problem = await self.fallbacks.problem(fallback)
            if problem is not None:
                tried.append(f"{fallback.name}: {problem}")
                self.metrics.fallback.labels(fallback.name, "unavailable").inc()
                continue
            try:
                response = HttpxResponse(await self.fallbacks.open_response(
                    fallback, _quoted_path(ex.request.path), ex.payload))
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


async def _say(ex: Exchange, chunks: progress.ProgressStream, text: str) -> bool:
    """Send ``text`` as a progress line if it says something new; True if it did."""
    chunk = chunks.reasoning(text)
    if chunk is None:
        return False
    ex.one_id = ex.one_id or progress.OneId(chunks.id)  # the model's chunks take this id
    await ex.body_part(chunk)
    return True


_PATH_SAFE = "/:@!$&'()*+,;=-._~"
"""What stays as it is in a forwarded path (RFC 3986 pchar); the rest is %-encoded."""
_QUERY_SAFE = bytes(range(0x21, 0x7F)).replace(b"#", b"")
"""What stays as it is in a forwarded query: printable ASCII but '#' (existing %XX too)."""


def _quoted_path(path: str) -> str:
    """The path swapd decided on, encoded again for a request line.

    The front end hands over the path percent-decoded: forwarding it as it is would let a
    decoded '?' or '#' move the path's end, a '%' start an escape, and a non-ASCII
    character fail the upstream request.
    """
    return quote(path, safe=_PATH_SAFE)


def _target(path: str, query: bytes) -> str:
    """The upstream request target: nothing in it can end the request line early."""
    return _quoted_path(path) + ("?" + quote_from_bytes(query, safe=_QUERY_SAFE)
                                 if query else "")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """``body`` as a JSON object; a 400 ``invalid_json`` for anything else.

    JSON nested deeper than Python's recursion limit raises RecursionError, not
    ValueError: that too is the client's malformed body, not swapd's failure.
    """
    try:
        payload = json.loads(body, parse_constant=_not_json)
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


def _not_json(constant: str) -> Any:
    """NaN and Infinity, which Python reads but JSON (and llama-server) does not."""
    raise ValueError(f"{constant} is not a JSON number")


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
