"""The fallback chain: remote OpenAI-compatible upstreams for when the local model can't.

Used when a local start fails, when a profile's circuit is open, and for requests that
name a fallback directly. Upstreams are tried in order; each is health-checked with
``GET {base_url}/models`` (its own ``timeout``), and the verdict is cached for
``HEALTH_TTL`` so a dead upstream costs one short timeout, not one per request.

The request's ``model`` is rewritten to the upstream's, the key comes from the named
environment variable (never from the client, never logged), and the client's own
``Authorization`` is never forwarded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import attrs
import httpx
import trio

from swapd.config import Fallback

log = logging.getLogger(__name__)

HEALTH_TTL = 15.0
"""Seconds a health verdict is reused before the upstream is checked again."""

STREAM_READ_TIMEOUT = 600.0
"""Longest silence tolerated between two bytes of an upstream's answer."""

RETRY_NEXT = frozenset({401, 403, 408, 409, 425, 429})
"""Statuses that say "not this upstream" rather than "bad request": try the next one."""


@attrs.define
class _Verdict:
    problem: str | None
    at: float


class FallbackChain:
    """Ordered upstreams with cached health; owns the HTTP client that reaches them."""

    def __init__(self, fallbacks: Sequence[Fallback],
                 client: httpx.AsyncClient | None = None) -> None:
        self.fallbacks = tuple(fallbacks)
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=STREAM_READ_TIMEOUT),
            limits=httpx.Limits(max_keepalive_connections=16, keepalive_expiry=30))
        self.used: dict[str, int] = {}
        """Requests served per upstream (status, metrics)."""
        self._health: dict[str, _Verdict] = {}

    def __bool__(self) -> bool:
        return bool(self.fallbacks)

    def replace(self, fallbacks: Sequence[Fallback]) -> None:
        """Adopt a reloaded list; health verdicts are kept for unchanged upstreams."""
        kept = {fb.name for fb in fallbacks if fb in self.fallbacks}
        self._health = {name: v for name, v in self._health.items() if name in kept}
        self.fallbacks = tuple(fallbacks)

    async def aclose(self) -> None:
        await self.client.aclose()

    def status(self) -> list[dict[str, Any]]:
        return [{"name": fb.name, "model": fb.model, "base_url": fb.base_url,
                 "healthy": None if fb.name not in self._health
                 else self._health[fb.name].problem is None,
                 "problem": self._health[fb.name].problem if fb.name in self._health else None,
                 "served": self.used.get(fb.name, 0)}
                for fb in self.fallbacks]

    async def problem(self, fallback: Fallback) -> str | None:
        """Why ``fallback`` can't be used now (cached), or None when it is healthy."""
        now = trio.current_time()
        cached = self._health.get(fallback.name)
        if cached is not None and now - cached.at < HEALTH_TTL:
            return cached.problem
        problem: str | None = None
        if fallback.api_key_env and not os.environ.get(fallback.api_key_env):
            problem = f"${fallback.api_key_env} is not set"
        else:
            try:
                response = await self.client.get(
                    fallback.base_url.rstrip("/") + "/models", headers=_auth(fallback),
                    timeout=fallback.timeout)
            except httpx.HTTPError as error:
                problem = f"health check failed: {type(error).__name__}: {error}"
            else:
                if response.status_code != 200:
                    problem = f"health check answered {response.status_code}"
        self._health[fallback.name] = _Verdict(problem, now)
        if problem:
            log.warning("fallback %s is unavailable: %s", fallback.name, problem)
        return problem

    def mark_down(self, fallback: Fallback, problem: str) -> None:
        self._health[fallback.name] = _Verdict(problem, trio.current_time())

    async def open_response(self, fallback: Fallback, path: str,
                            payload: dict[str, Any]) -> httpx.Response:
        """Send the request to ``fallback`` with its model and key; the caller closes it."""
        body = json.dumps({**payload, "model": fallback.model}).encode()
        url = fallback.base_url.rstrip("/") + path.removeprefix("/v1")
        request = self.client.build_request(
            "POST", url, content=body,
            headers={"content-type": "application/json", **_auth(fallback)},
            timeout=httpx.Timeout(fallback.timeout, read=STREAM_READ_TIMEOUT))
        return await self.client.send(request, stream=True)


def _auth(fallback: Fallback) -> dict[str, str]:
    key = os.environ.get(fallback.api_key_env) if fallback.api_key_env else None
    return {"authorization": f"Bearer {key}"} if key else {}


def describe(tried: Sequence[str]) -> str:
    return "; ".join(tried) if tried else "no fallbacks are configured"
