"""Optional API keys: one set for everything, a separate one for operations.

Keys come from an environment variable (several may be separated by commas or
whitespace) or a file (one per line, ``#`` comments allowed), never from the config
itself, and are compared in constant time against every configured key. A client
sends one as ``Authorization: Bearer KEY`` or ``x-api-key: KEY``.

* ``security.api_key_*``: required on every endpoint except ``/health`` (liveness
  probes and load balancers must not need a secret) and the status page's static
  files (``/``, ``/ui/...``: they hold no data; the page sends the key with its calls).
* ``security.admin_key_*``: required on ``/swapd/*``, ``/metrics`` and llama.cpp's
  model management under ``/models/`` (load, unload, its event feed: the powers of
  ``/swapd/load``, ``/swapd/unload`` and ``/swapd/events``); when only API keys are
  set, those endpoints take an API key like any other. The model list ``/models``
  itself is an API route, like ``/v1/models``.

Which key a request needs is decided on its path, so that path must be the one the
router dispatches on. Werkzeug's router merges slashes (``//swapd/status`` is
``/swapd/status`` to it) and Quart routes an absolute-form target
(``GET http://host/swapd/status``) by its path part. ``path_problem`` refuses every path
that any layer could read differently, before the key check and before routing, so the
key check and the router always see the same canonical path.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

from swapd.config import Security
from swapd.errors import ConfigError

OPEN_PATHS = frozenset({"/health", "/"})
ADMIN_PREFIXES = ("/swapd/", "/metrics", "/models/")

_MAX_SHOWN = 200
"""Characters of a refused path quoted back in the error message."""


def path_problem(path: str) -> str | None:
    """Why swapd refuses to route ``path`` (already percent-decoded), or None.

    Refused: a path that is not absolute (an absolute-form target, ``*``), an empty
    segment (``//``), a ``.`` or ``..`` segment, and characters no route has and that
    could end a request line upstream (controls, whitespace). Every route swapd serves
    has a spelling that passes, so a refusal never hides a route from a correct client.
    """
    shown = path if len(path) <= _MAX_SHOWN else path[:_MAX_SHOWN] + "..."
    if not path.startswith("/"):
        return f"the request target {shown!r} is not a path; send an absolute path (/v1/...)"
    if "//" in path:
        return f"the path {shown!r} has an empty segment ('//'); remove the extra slash"
    if "/." in path and any(segment in (".", "..") for segment in path.split("/")):
        return f"the path {shown!r} has a '.' or '..' segment; send the resolved path"
    if " " in path or not path.isprintable():
        return (f"the path {shown!r} holds a space or a control character; "
                "no swapd route has one")
    return None


@attrs.frozen
class Keys:
    api: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    def required(self, path: str) -> tuple[bytes, ...]:
        """The keys that may open ``path``; empty means no key is needed."""
        if path in OPEN_PATHS or path.startswith("/ui/"):
            return ()
        if path.startswith(ADMIN_PREFIXES) and self.admin:
            return self.admin
        return self.api

    def allows(self, path: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        required = self.required(path)
        if not required:
            return True
        presented = _presented(headers)
        if presented is None:
            return False
        # Compare with every key, without stopping early: timing says nothing.
        matches = [hmac.compare_digest(presented, key) for key in required]
        return any(matches)


def _presented(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip()
        if lowered == b"x-api-key":
            return value.strip()
    return None


def load_keys(security: Security, environ: Mapping[str, str] = os.environ) -> Keys:
    """Read the configured keys; a named but empty or unreadable source is an error."""
    return Keys(
        api=_read(security.api_key_env, security.api_key_file, "security.api_key", environ),
        admin=_read(security.admin_key_env, security.admin_key_file, "security.admin_key",
                    environ),
    )


def _read(env: str | None, file: Path | None, key: str,
          environ: Mapping[str, str]) -> tuple[bytes, ...]:
    if env is not None:
        values = environ.get(env, "").replace(",", " ").split()
        if not values:
            raise ConfigError([f"${env} is empty or not set @ {key}_env; set it to the "
                               "key(s) clients must send, or remove the setting"])
        return tuple(v.encode() for v in values)
    if file is not None:
        try:
            lines = file.read_text().splitlines()
        except OSError as error:
            raise ConfigError([f"cannot read {file}: {error.strerror} @ {key}_file"]) from None
        values = [line.strip() for line in lines
                  if line.strip() and not line.lstrip().startswith("#")]
        if not values:
            raise ConfigError([f"{file} holds no key @ {key}_file"])
        return tuple(v.encode() for v in values)
    return ()
