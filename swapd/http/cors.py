"""CORS: which web pages may call swapd from a browser, and the headers that say so.

A browser lets a page read an answer from another origin only if the answer carries
``Access-Control-Allow-Origin``; before a request with an ``Authorization`` header or a
JSON body it first sends a preflight (``OPTIONS`` with ``Access-Control-Request-Method``)
and sends the request only if the preflight allows it. swapd answers preflights itself,
for every route and without a key (a browser never sends one on a preflight), and adds
the header to every answer to an allowed origin, whoever wrote it: llama-server's own
CORS headers are dropped, so there is only ever swapd's.

Which origins (``cors.allow_origins``, docs/http.md#cors):

* a list: ``"*"`` (any origin), or exact origins (``https://chat.example.com``), which
  are echoed back with ``Vary: Origin``; ``[]`` turns CORS off;
* unset: ``*`` when API keys are configured (a page can then do nothing without a key
  its user gave it), else only pages served from this machine (``localhost``,
  ``127.0.0.1``, ``[::1]``, any port): without keys, ``*`` would let any web site a
  user visits read the models, the logs and the answers of the swapd on their machine.

Everything here is a pure function of the policy and the request's headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from swapd.config import Config

MAX_AGE = 7200
"""Seconds a browser may cache a preflight's answer (Chromium's own upper bound)."""

ALLOWED_HEADERS = (b"authorization", b"content-type", b"x-api-key")
"""Request headers every preflight allows, whatever else it asked for."""

ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

EXPOSED_HEADERS = b"retry-after, www-authenticate"
"""Response headers a page may read besides the CORS-safelisted ones."""

UPSTREAM_HEADERS = frozenset({
    b"access-control-allow-origin", b"access-control-allow-credentials",
    b"access-control-allow-methods", b"access-control-allow-headers",
    b"access-control-expose-headers", b"access-control-max-age",
})
"""CORS headers an upstream (llama-server, cpp-httplib) may send: never relayed."""

_LOOPBACK = re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?")
_TOKEN_LIST = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


@attrs.frozen
class Policy:
    """Which origins are allowed: any (``*``), the loopback ones, or those listed."""

    any: bool = False
    loopback: bool = False
    origins: frozenset[str] = frozenset()

    @property
    def off(self) -> bool:
        return not (self.any or self.loopback or self.origins)

    def allowed(self, origin: bytes) -> bool:
        text = origin.decode("latin-1")
        return self.any or text in self.origins or bool(
            self.loopback and _LOOPBACK.fullmatch(text))


def policy(config: Config) -> Policy:
    """The policy ``config`` asks for; unset: see the module docstring."""
    origins = config.cors.allow_origins
    if origins is None:
        keyed = bool(config.security.api_key_env or config.security.api_key_file)
        return Policy(any=keyed, loopback=not keyed)
    return Policy(any="*" in origins, origins=frozenset(o for o in origins if o != "*"))


def _origin(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"origin":
            return value
    return None


def answer_headers(policy: Policy, headers: Iterable[tuple[bytes, bytes]],
                   ) -> list[tuple[bytes, bytes]]:
    """The CORS headers for the answer to a request with ``headers`` (lower-case names):
    none unless it came from an allowed origin."""
    if policy.off:
        return []
    origin = _origin(headers)
    if origin is None or not policy.allowed(origin):
        return []
    if policy.any:
        return [(b"access-control-allow-origin", b"*"),
                (b"access-control-expose-headers", EXPOSED_HEADERS)]
    return [(b"access-control-allow-origin", origin), (b"vary", b"origin"),
            (b"access-control-expose-headers", EXPOSED_HEADERS)]


def is_preflight(method: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """An ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``: a browser
    asking whether it may send a request. Any other ``OPTIONS`` is routed as usual."""
    if method != "OPTIONS":
        return False
    names = {name for name, _ in headers}
    return b"origin" in names and b"access-control-request-method" in names


def preflight_headers(policy: Policy, headers: Iterable[tuple[bytes, bytes]],
                      ) -> list[tuple[bytes, bytes]] | None:
    """The headers of a 204 that allows the preflight with ``headers``; None if its
    origin is not allowed."""
    headers = list(headers)
    origin = _origin(headers)
    if policy.off or origin is None or not policy.allowed(origin):
        return None
    allowed = list(ALLOWED_HEADERS)
    for name, value in headers:
        if name == b"access-control-request-headers" and _TOKEN_LIST.fullmatch(
                value.strip()):
            allowed += [token.strip().lower() for token in value.split(b",")
                        if token.strip().lower() not in allowed]
    answer = [(b"access-control-allow-origin", b"*" if policy.any else origin),
              (b"access-control-allow-methods", ALLOWED_METHODS),
              (b"access-control-allow-headers", b", ".join(allowed)),
              (b"access-control-max-age", b"%d" % MAX_AGE)]
    if any(name == b"access-control-request-private-network" for name, _ in headers):
        # Chromium's Private Network Access: a public page asking to reach this machine.
        answer.append((b"access-control-allow-private-network", b"true"))
    if not policy.any:
        answer.append((b"vary", b"origin, access-control-request-method, "
                                b"access-control-request-headers"))
    return answer
