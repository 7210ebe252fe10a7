"""Field readers: one small function per kind of value (duration, size, port, flags...).

Each turns a raw YAML value into the field's type or raises :class:`_Problem` with the
message and fix; the model's fields name their reader with ``Annotated[..., _Reader]``
(the aliases at the end of this module), so each rule is written once, next to its type.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import attrs

from swapd.config.flags import SWAPD_OWNED, FlagValue, canonical_flag, format_value

K = TypeVar("K")
T = TypeVar("T")
V = TypeVar("V")


class FrozenDict(Mapping[K, V]):
    """An immutable mapping that keeps insertion order and is hashable (when its values
    are), so frozen config classes stay hashable and compare equal to plain dicts."""

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping[K, V] | None = None) -> None:
        self._items: dict[K, V] = dict(items or {})
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenDict({self._items!r})"


# --- durations and sizes -------------------------------------------------------------

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(rf"({_NUMBER})\s*([KMGT]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or text like ``500ms``, ``30s``, ``2m``, ``1h``,
    ``1m30s``. Raises ``ValueError`` saying what is expected."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(_NUMBER, value.strip()):
        seconds = float(value.strip())
    elif isinstance(value, str) and _DURATION.fullmatch(value.strip()):
        seconds = sum(float(number) * _DURATION_UNITS[unit]
                      for number, unit in _DURATION_PART.findall(value.strip()))
    else:
        raise ValueError(f"expected a duration like 30s, 500ms or 2m, got {_show(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number of seconds, 0 or more, "
                         f"got {_show(value)}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from a number or text like ``512KiB``, ``16MiB``, ``1GiB`` (powers of 1024)
    or ``10MB``, ``1GB`` (powers of 1000). Raises ``ValueError`` saying what is expected."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = float(value)
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        number, unit = match.groups()
        size = float(number) * _SIZE_UNITS[(unit or "b").lower()]
    else:
        raise ValueError(f"expected a size like 512KiB, 16MiB or 1GiB, got {_show(value)}")
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {_show(value)}")
    return round(size)


def _show(value: object) -> str:
    """A value as the user wrote it, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


# --- problems and readers ------------------------------------------------------------

_LOOPBACK = "127.0.0.1"


def _join(path: str, segment: str) -> str:
    if not segment:
        return path
    if not path or segment.startswith("["):
        return f"{path}{segment}"
    return f"{path}.{segment}"


def _where(path: str) -> str:
    return f" @ {path}" if path else " at the top level"


class _Problem(ValueError):
    """One thing wrong in the config; the walker supplies the path where it was found.

    ``at`` extends that path (a key inside a mapping the reader handled itself);
    ``path_first`` renders ``path: message``, used for flags, whose keys are the user's.
    """

    def __init__(self, message: str, *, hint: str | None = None, at: str = "",
                 path_first: bool = False) -> None:
        where = f" @ {at}" if at else ""
        super().__init__(f"{message}{where} — {hint}" if hint else f"{message}{where}")
        self.message = message
        self.hint = hint
        self.at = at
        self.path_first = path_first

    def render(self, path: str) -> str:
        path = _join(path, self.at)
        text = f"{path}: {self.message}" if self.path_first else f"{self.message}{_where(path)}"
        return f"{text} — {self.hint}" if self.hint else text


@attrs.frozen
class _Reader:
    """How one field is read from YAML; attached to the field's type with ``Annotated``."""

    read: Callable[[Any], Any]


def _whole_number(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Problem(f"expected a whole number, got {_show(value)}")


def _bounded(parse: Callable[[Any], float], minimum: float, *, exclusive: bool = False,
             unit: str = "") -> _Reader:
    """A reader that parses with ``parse`` and refuses values below ``minimum``."""

    def read(value: object) -> float:
        number = parse(value)
        if number < minimum or (exclusive and number == minimum):
            relation = "more than" if exclusive else "at least"
            raise _Problem(f"must be {relation} {minimum:g}{unit}, got {_show(value)}")
        return number

    return _Reader(read)


def _port(value: object) -> int:
    port = _whole_number(value)
    if not 0 <= port <= 65535:
        raise _Problem(f"expected a port number from 0 to 65535, got {_show(value)}")
    return port


def _child_port(value: object) -> int | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise _Problem(f"expected 'auto' or a port number from 1 to 65535, got {_show(value)}")


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    hint = f"quote it: '{_show(value)}'" if isinstance(value, int | float) else None
    raise _Problem(f"expected text, got {_show(value)}", hint=hint)


def _nonempty_text(value: object) -> str:
    text = _text(value)
    if not text.strip():
        raise _Problem("must not be empty")
    return text


def _read_command(value: object) -> tuple[str, ...]:
    """One program (name on PATH or a path; never split on spaces) or an argv list."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _Problem(f"expected a program name, a path or an argv list, got {_show(value)}")
    if not items:
        raise _Problem("the command is empty", hint="name the llama-server program")
    argv: list[str] = []
    for index, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise _Problem(f"expected text, got {_show(item)}", at=f"[{index}]")
        argv.append(item if isinstance(item, str) else format_value(item))
    if not argv[0].strip():
        raise _Problem("the program name is empty", hint="name the llama-server program")
    return tuple(argv)


def _loopback_host(value: object) -> str:
    host = _text(value).strip()
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        loopback = bare == "localhost" or ipaddress.ip_address(bare).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise _Problem(
            f"must be a loopback address (127.0.0.1, ::1 or localhost), got {_show(value)}",
            hint="the child always binds loopback; set 'listen' to serve a LAN")
    return bare


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(value: object) -> str:
    # Never echo the value: people paste the key itself here by mistake.
    if isinstance(value, str) and ENV_NAME.fullmatch(value):
        return value
    raise _Problem("expected the name of an environment variable, like OPENROUTER_API_KEY",
                   hint="put the key itself in that variable, not in this file")


def _http_url(value: object) -> str:
    url = _text(value).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _Problem(f"expected an http:// or https:// URL, got {_show(value)}",
                       hint="like https://openrouter.ai/api/v1")
    if parts.path.rstrip("/").endswith(("/chat/completions", "/completions")):
        raise _Problem(f"expected the API's base URL, got the endpoint {_show(value)}",
                       hint="end it at the version, like https://openrouter.ai/api/v1")
    return url.rstrip("/")


def _read_names(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _Problem(f"expected a list of names, got {_show(value)}")
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise _Problem(f"expected text, got {_show(item)}", at=f"[{index}]")
    return tuple(items)


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", re.IGNORECASE)


def _read_origins(value: object) -> tuple[str, ...]:
    """``"*"``, or exact origins (``scheme://host[:port]``, no path), or ``null``."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _Problem(f"expected a list of origins, got {_show(value)}",
                       hint="write e.g. ['https://chat.example.com'], ['*'] or []")
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise _Problem(f"expected text, got {_show(item)}", at=f"[{index}]")
        if item not in ("*", "null") and not _ORIGIN.fullmatch(item):
            raise _Problem(f"{item!r} is not an origin", at=f"[{index}]",
                           hint="write scheme://host[:port] as the browser sends it, "
                                "with no path or trailing slash, or '*'")
    return tuple(item.lower() for item in items)  # as browsers send them


def _read_env(value: object) -> FrozenDict[str, str]:
    """Variables added to the inherited environment; numbers become text."""
    if value is None:
        return FrozenDict()
    if not isinstance(value, Mapping):
        raise _Problem(f"expected a mapping of variable names to values, got {_show(value)}")
    env: dict[str, str] = {}
    problems: list[_Problem] = []
    for key, item in value.items():
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key):
            problems.append(_Problem(f"{key!r} is not an environment variable name"))
        elif isinstance(item, bool) or not isinstance(item, str | int | float):
            problems.append(_Problem(f"expected text, got {_show(item)}", at=key,
                                     hint=f"quote it: '{_show(item)}'"
                                     if isinstance(item, bool) else None))
        else:
            env[key] = item if isinstance(item, str) else format_value(item)
    if problems:
        raise ExceptionGroup("invalid env", problems)
    return FrozenDict(env)


_OWNED_HINTS = {
    "model": "set the profile's 'model' key instead",
    "host": "set llama_server.host instead",
    "port": "set llama_server.port for a fixed port",
}


def _flag_value(key: str, value: object) -> FlagValue:
    if value is None or isinstance(value, str | int | float):  # bool is an int
        return value
    if isinstance(value, list):
        for item in value:
            if isinstance(item, bool) or not isinstance(item, str | int | float):
                raise _Problem(f"{key!r}: list items must be text or numbers, "
                               f"got {_show(item)}", path_first=True)
        return tuple(value)
    raise _Problem(f"{key!r} must be text, a number, true, false, null or a list of those, "
                   f"got {_show(value)}", path_first=True)


def _read_flags(value: object) -> FrozenDict[str, FlagValue]:
    """llama-server flags as written (translated later by :mod:`swapd.config.flags`)."""
    if value is None:
        return FrozenDict()
    if not isinstance(value, Mapping):
        raise _Problem(f"expected a mapping of llama-server flag names to values, "
                       f"got {_show(value)}", path_first=True)
    flags: dict[str, FlagValue] = {}
    first_spelling: dict[str, str] = {}
    problems: list[_Problem] = []
    for key, item in value.items():
        try:
            if not isinstance(key, str):
                raise _Problem(f"flag name {key!r} must be text", path_first=True)
            canonical = canonical_flag(key)
            if canonical in SWAPD_OWNED:
                raise _Problem(f"{key!r} is set by swapd; remove it "
                               f"(swapd passes --{canonical} itself)",
                               hint=_OWNED_HINTS[canonical], path_first=True)
            if canonical in first_spelling:
                raise _Problem(f"{first_spelling[canonical]!r} and {key!r} both set "
                               f"--{canonical}; keep one", path_first=True)
            first_spelling[canonical] = key
            flags[key] = _flag_value(key, item)
        except _Problem as problem:
            problems.append(problem)
        except ValueError as error:  # from canonical_flag: not a flag name
            problems.append(_Problem(str(error), path_first=True))
    if problems:
        raise ExceptionGroup("invalid flags", problems)
    return FrozenDict(flags)


def _read_gpu_choice(value: object) -> tuple[int, ...]:
    """A profile's ``gpu``: ``auto`` (any one GPU: empty), an id, or a list of ids (split)."""
    if value is None or value == "auto":
        return ()
    items = value if isinstance(value, list) else [value]
    ids: list[int] = []
    for item in items:
        if not isinstance(item, int) or isinstance(item, bool) or item < 0:
            raise _Problem(f"expected 'auto', a GPU id (0, 1, ...) or a list of ids, "
                           f"got {_show(value)}")
        if item in ids:
            raise _Problem(f"GPU {item} is listed twice")
        ids.append(item)
    if not ids:
        raise _Problem("an empty list names no GPU", hint="write 'auto' or a GPU id")
    return tuple(ids)


def _read_mode(value: object) -> str:
    if value in ("count", "budget"):
        return str(value)
    raise _Problem(f"expected 'count' or 'budget', got {_show(value)}",
                   hint="'budget' lets each GPU's memory decide which models stay loaded")


# Field types: what a field holds (for mypy and readers of the code) and how it is read.
Seconds = Annotated[float, _bounded(parse_duration, 0, unit="s")]
PositiveSeconds = Annotated[float, _bounded(parse_duration, 0, exclusive=True, unit="s")]
Count = Annotated[int, _bounded(_whole_number, 0)]
PositiveCount = Annotated[int, _bounded(_whole_number, 1)]
PositiveBytes = Annotated[int, _bounded(parse_size, 0, exclusive=True, unit=" bytes")]
Bytes = Annotated[int, _bounded(parse_size, 0, unit=" bytes")]
GpuChoice = Annotated[tuple[int, ...], _Reader(_read_gpu_choice)]
Port = Annotated[int, _Reader(_port)]
EnvName = Annotated[str, _Reader(_env_name)]
Env = Annotated[Mapping[str, str], _Reader(_read_env)]
Flags = Annotated[Mapping[str, FlagValue], _Reader(_read_flags)]
Names = Annotated[tuple[str, ...], _Reader(_read_names)]
Origins = Annotated[tuple[str, ...], _Reader(_read_origins)]
