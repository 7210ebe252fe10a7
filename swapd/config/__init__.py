"""The manifest: swapd's YAML configuration, read into frozen attrs classes.

:func:`load_config` reads a file, :func:`parse_config` a string. Both either return a
complete, valid :class:`Config` or raise :class:`~swapd.errors.ConfigError` listing
*every* problem found, each naming where it is and, where there is one, the fix::

    unknown key 'flag' @ profiles.qwen — did you mean 'flags'?
    expected a duration like 30s, 500ms or 2m, got 'soon' @ timeouts.start
    profiles.qwen.flags: 'port' is set by swapd; remove it (swapd passes --port itself)
    duplicate name 'qwen' @ profiles.b.aliases — already used by profile 'a'

How it works, and why:

* **YAML** is read with :class:`_StrictLoader`: only ``true``/``false`` are booleans
  (``flash-attn: on`` stays the text ``"on"``, which llama-server wants), ``1:30`` is not
  the number 90, ``0123`` is not octal 83, dates stay text, and a key given twice in one
  mapping is an error instead of the last one silently winning.
* **Structure** comes from a cattrs converter with ``forbid_extra_keys``. Fields that need
  more than a type (durations, sizes, ports, bounds) say so with ``Annotated[..., _Reader]``
  so each rule sits next to the field it governs. Readers raise :class:`_Problem`; cattrs
  collects all of them with the attribute path, and :func:`_walk` renders that path as
  ``profiles.qwen.flags`` / ``fallbacks[1].base_url``.
* **Names** (profile names, aliases, fallback names) are checked on the raw data, so a
  duplicate or malformed name is reported together with type errors elsewhere.

Relative paths (``model``, ``state_dir``, key files) resolve against the config file's
directory, so a config and its models can move together. Missing model files are not a
load error: a model may sit on a disk mounted later; ``swapd check`` reports them via
:func:`missing_model_files`.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import attrs
import cattrs
import yaml
from cattrs.errors import (
    BaseValidationError,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

from swapd.config.flags import SWAPD_OWNED, FlagValue, canonical_flag, format_value
from swapd.errors import ConfigError

__all__ = [
    "Config", "Fallback", "FlagValue", "FrozenDict", "Gpu", "Listen", "LlamaServer", "Logs",
    "Profile", "Progress", "Queue", "Residency", "Restart", "Security", "Timeouts",
    "default_state_dir", "host_port", "load_config", "missing_model_files", "parse_config",
    "parse_duration", "parse_size",
]

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


# --- YAML ----------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"

_YAML_BOOL = re.compile(r"^(?:true|false)$", re.IGNORECASE)
_YAML_INT = re.compile(r"""^(?:[-+]?(?:0|[1-9][0-9_]*)
                            |[-+]?0x[0-9a-fA-F_]+
                            |[-+]?0o[0-7_]+
                            |[-+]?0b[01_]+)$""", re.X)
_YAML_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                              |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                              |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                              |[-+]?\.(?:inf|Inf|INF)
                              |\.(?:nan|NaN|NAN))$""", re.X)

_Resolvers = dict[Any, list[tuple[Any, re.Pattern[str]]]]


def _strict_resolvers() -> _Resolvers:
    """SafeLoader's implicit types, minus YAML 1.1's surprises (see module doc)."""
    replaced = {_BOOL_TAG, _INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG}
    table: _Resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in replaced]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for tag, regexp, firsts in ((_BOOL_TAG, _YAML_BOOL, "tTfF"),
                                (_FLOAT_TAG, _YAML_FLOAT, "-+0123456789."),
                                (_INT_TAG, _YAML_INT, "-+0123456789")):
        for first in firsts:
            table.setdefault(first, []).append((tag, regexp))
    return table


_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser when PyYAML has it: a 1,000-profile config loads in 0.33 s, not 1.5."""


class _StrictLoader(_BaseLoader):  # type: ignore[misc,valid-type]
    """``yaml.SafeLoader`` where only true/false are booleans and duplicate keys fail."""

    yaml_implicit_resolvers = _strict_resolvers()

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # '<<' merges may override; that is their point
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} twice (the second would silently replace the "
                    "first)", key_node.start_mark)
            seen.add(key)
        # Named, not super(): with the C loader the MRO does not reach it that way.
        return yaml.constructor.SafeConstructor.construct_mapping(self, node, deep=deep)


def _read_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({error.context})" if error.context else ""
        raise ConfigError([f"invalid YAML{where}: {error.problem}{context}"],
                          source=source) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"invalid YAML: {error}"], source=source) from None


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


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(value: object) -> str:
    # Never echo the value: people paste the key itself here by mistake.
    if isinstance(value, str) and _ENV_NAME.fullmatch(value):
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
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
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


# --- converters for direct construction (tests, reload diffs) --------------------------


def _freeze_env(env: Mapping[str, str]) -> Mapping[str, str]:
    return env if isinstance(env, FrozenDict) else FrozenDict(env)


def _freeze_flags(flags: Mapping[str, FlagValue]) -> Mapping[str, FlagValue]:
    if isinstance(flags, FrozenDict):
        return flags
    return FrozenDict({key: tuple(value) if isinstance(value, list) else value
                       for key, value in flags.items()})


def _freeze_profiles(profiles: Mapping[str, Profile]) -> Mapping[str, Profile]:
    return profiles if isinstance(profiles, FrozenDict) else FrozenDict(profiles)


def _str_tuple(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)


def _int_tuple(items: int | Iterable[int]) -> tuple[int, ...]:
    return (items,) if isinstance(items, int) else tuple(items)


def _fallback_tuple(items: Iterable[Fallback]) -> tuple[Fallback, ...]:
    return tuple(items)


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (set by systemd's ``StateDirectory=``), else
    ``$XDG_STATE_HOME/swapd``, else ``~/.local/state/swapd``."""
    systemd = os.environ.get("STATE_DIRECTORY", "")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if xdg:
        return Path(xdg).expanduser() / "swapd"
    return Path("~/.local/state/swapd").expanduser()


# --- the manifest --------------------------------------------------------------------


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL or request line writes it: IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.frozen
class Listen:
    """Where swapd's front end listens. YAML: ``127.0.0.1:9001``, ``0.0.0.0:9001``,
    ``[::1]:9001``, ``:9001`` (default host, so still loopback), a bare port, or a mapping.
    Port 0 picks a free port (tests)."""

    host: str = _LOOPBACK
    port: Port = 9001

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)


@attrs.frozen
class LlamaServer:
    """How to run the child. ``command`` is one program (a name on PATH or a path, never
    split on spaces) or an argv list; ``port`` None means auto (swapd picks a free one).
    ``host`` must be loopback: the child is only ever reached through swapd (SPEC §6)."""

    command: Annotated[tuple[str, ...], _Reader(_read_command)] = attrs.field(
        default=("llama-server",), converter=_str_tuple)
    host: Annotated[str, _Reader(_loopback_host)] = _LOOPBACK
    port: Annotated[int | None, _Reader(_child_port)] = None
    env: Env = attrs.field(default=FrozenDict(), converter=_freeze_env)


@attrs.frozen
class Timeouts:
    """Deadlines, in seconds. ``health_interval`` is the readiness poll of ``/health``
    while a model loads; ``health_check`` the liveness probe of a ready one (0 = off).

    ``first_byte`` and ``upstream_idle`` bound the silences of the child's answers:
    until the first byte of an answer's body (prompt processing, and the whole
    generation of a non-streamed answer) and then between two reads. A profile may set
    its own (``profiles.NAME.timeouts``). ``body``, ``send`` and ``headers`` bound what
    swapd waits for from its clients."""

    start: PositiveSeconds = 120.0
    stop: PositiveSeconds = 10.0
    queue_wait: PositiveSeconds = 120.0
    drain: Seconds = 30.0
    health_interval: PositiveSeconds = 0.02
    health_check: Seconds = 10.0
    health_check_timeout: PositiveSeconds = 5.0
    first_byte: PositiveSeconds = 600.0
    upstream_idle: PositiveSeconds = 120.0
    body: PositiveSeconds = 30.0
    send: PositiveSeconds = 30.0
    headers: PositiveSeconds = 5.0


@attrs.frozen
class AnswerTimeouts:
    """A profile's own deadlines for its child's answers; None keeps the global one."""

    first_byte: PositiveSeconds | None = None
    upstream_idle: PositiveSeconds | None = None


@attrs.frozen
class Queue:
    """``starvation_bound``: how long a busy ready model may keep serving newcomers while
    another model's requests wait, before swapd swaps anyway."""

    max_waiting: Count = 10
    starvation_bound: Seconds = 10.0


@attrs.frozen
class Restart:
    """Crash/failed-start policy: backoff doubles from ``backoff`` up to ``backoff_max``;
    ``max_failures`` in a row open the circuit for ``cooldown``. Only a run of
    ``stable_after`` forgets a profile's failures: one that loads and then crashes
    soon after keeps counting (a crash loop opens the circuit)."""

    max_failures: PositiveCount = 3
    cooldown: Seconds = 60.0
    backoff: Seconds = 1.0
    backoff_max: Seconds = 30.0
    stable_after: Seconds = 60.0

    def __attrs_post_init__(self) -> None:
        if self.backoff_max < self.backoff:
            raise _Problem(f"must be at least backoff ({self.backoff:g}s), "
                           f"got {self.backoff_max:g}s", at="backoff_max")


@attrs.frozen
class Progress:
    """Progress on a waiting request's own stream (SPEC §4)."""

    reasoning: bool = True
    keepalive: PositiveSeconds = 5.0


@attrs.frozen
class Logs:
    """The child's log file in ``state_dir`` is capped at ``max_bytes``; the last
    ``tail_lines`` lines are also kept in memory for ``/swapd/logs`` and errors."""

    max_bytes: PositiveBytes = 10 * 2**20
    tail_lines: Count = 500


@attrs.frozen
class Security:
    """Optional API keys, each from an environment variable or a file (one, not both)."""

    api_key_env: EnvName | None = None
    api_key_file: Path | None = None
    admin_key_env: EnvName | None = None
    admin_key_file: Path | None = None
    max_body: PositiveBytes = 32 * 2**20
    max_pending_bodies: PositiveBytes | None = None
    """Bytes of request bodies still being received, all requests together; None:
    twice ``max_body``, so two bodies of the largest size can arrive at once."""

    def __attrs_post_init__(self) -> None:
        for kind in ("api_key", "admin_key"):
            if getattr(self, f"{kind}_env") and getattr(self, f"{kind}_file"):
                raise _Problem(f"set {kind}_env or {kind}_file, not both")
        if self.max_pending_bodies is not None and self.max_pending_bodies < self.max_body:
            raise _Problem(f"must be at least max_body ({self.max_body} bytes), got "
                           f"{self.max_pending_bodies}", at="max_pending_bodies",
                           hint="or no body of the largest allowed size could be received")

    @property
    def pending_bodies_limit(self) -> int:
        return 2 * self.max_body if self.max_pending_bodies is None else self.max_pending_bodies


@attrs.frozen
class Cors:
    """Which web pages may call swapd from a browser (``swapd/http/cors.py``). None: ``*`` when
    API keys are set, else pages served from this machine (loopback origins) only."""

    allow_origins: Origins | None = attrs.field(
        default=None, converter=attrs.converters.optional(_str_tuple))


@attrs.frozen
class Memory:
    """GPU memory, for the per-profile estimate's verdict and the optional swap guard."""

    gpu: PositiveBytes | None = None  # None: what nvidia-smi reports, if anything
    guard: bool = False  # refuse to start a profile whose estimate does not fit


@attrs.frozen
class Gpu:
    """A device swapd may load models on, and the bytes of it that models may use."""

    id: Count
    memory: PositiveBytes


def _gpu_tuple(items: Iterable[Gpu]) -> tuple[Gpu, ...]:
    return tuple(items)


@attrs.frozen
class Residency:
    """How many models stay loaded at once (docs/residency.md).

    ``mode: count`` (the default) keeps at most ``max_models`` (default 1: one model at a
    time); ``mode: budget`` lets each GPU's memory less ``reserve`` decide, with
    ``max_models`` as an optional cap on top (default: none).
    """

    mode: Annotated[str, _Reader(_read_mode)] = "count"
    max_models: PositiveCount | None = None
    reserve: Bytes = 512 * 2**20

    @property
    def cap(self) -> int | None:
        """The most models resident at once; None: only memory limits it."""
        if self.max_models is not None:
            return self.max_models
        return 1 if self.mode == "count" else None


@attrs.frozen
class Cache:
    """Warm return: llama-server's slot KV caches saved before a swap, restored after."""

    keep: bool = False  # the default for profiles that don't set keep_cache
    budget: PositiveBytes = 20 * 2**30
    min_tokens: Count = 256  # smaller prompts are cheaper to process again than to save


@attrs.frozen
class Profile:
    """One model the clients may ask for; ``name`` is its key under ``profiles``."""

    name: str
    model: Path = attrs.field(converter=Path)
    display_name: str | None = None
    aliases: Names = attrs.field(default=(), converter=_str_tuple)
    ttl: Seconds | None = None
    env: Env = attrs.field(default=FrozenDict(), converter=_freeze_env)
    flags: Flags = attrs.field(default=FrozenDict(), converter=_freeze_flags)
    description: str | None = None
    keep_cache: bool | None = None  # None: cache.keep
    pinned: bool = False  # loaded at start, never evicted by the planner
    preload: bool = False  # loaded at start, evictable like any other
    gpu: GpuChoice = attrs.field(default=(), converter=_int_tuple)  # () = auto
    memory: PositiveBytes | None = None  # footprint when the estimate cannot size it
    timeouts: AnswerTimeouts = attrs.field(factory=AnswerTimeouts)

    @property
    def label(self) -> str:
        return self.display_name or self.name

    @property
    def ctx_size(self) -> int | None:
        """The context size its flags set (``ctx-size``, ``c``, ``n_ctx``...), or None when
        unset or 0 (0 makes llama-server use the model's own training context)."""
        for key, value in self.flags.items():
            try:
                if canonical_flag(key) != "ctx-size":
                    continue
            except ValueError:
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                size = value
            elif isinstance(value, str) and value.strip().isdigit():
                size = int(value)
            else:
                return None
            return size if size > 0 else None
        return None


@attrs.frozen
class Fallback:
    """A remote OpenAI-compatible upstream; ``model`` is the upstream's name for it."""

    name: str
    base_url: Annotated[str, _Reader(_http_url)]
    model: Annotated[str, _Reader(_nonempty_text)]
    api_key_env: EnvName | None = None
    timeout: PositiveSeconds = 10.0


@attrs.frozen(kw_only=True)
class Config:
    """The whole manifest. Build it with :func:`load_config` or :func:`parse_config`."""

    listen: Listen = attrs.field(factory=Listen)
    state_dir: Path = attrs.field(factory=default_state_dir, converter=Path)
    llama_server: LlamaServer = attrs.field(factory=LlamaServer)
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    queue: Queue = attrs.field(factory=Queue)
    restart: Restart = attrs.field(factory=Restart)
    ttl: Seconds = 0.0
    progress: Progress = attrs.field(factory=Progress)
    logs: Logs = attrs.field(factory=Logs)
    security: Security = attrs.field(factory=Security)
    cors: Cors = attrs.field(factory=Cors)
    cache: Cache = attrs.field(factory=Cache)
    memory: Memory = attrs.field(factory=Memory)
    gpus: tuple[Gpu, ...] = attrs.field(default=(), converter=_gpu_tuple)
    residency: Residency = attrs.field(factory=Residency)
    profiles: Mapping[str, Profile] = attrs.field(converter=_freeze_profiles)
    fallbacks: tuple[Fallback, ...] = attrs.field(default=(), converter=_fallback_tuple)

    def __attrs_post_init__(self) -> None:
        port = self.llama_server.port
        if port is not None and port == self.listen.port:
            raise _Problem(f"port {port} is also swapd's listen port",
                           hint="choose another port or 'auto'", at="llama_server.port")
        if port is not None and self.residency.cap != 1:
            raise _Problem(f"port {port} is fixed, but several models may be loaded at once "
                           "and each llama-server needs its own port",
                           hint="use port: auto, or residency.max_models: 1",
                           at="llama_server.port")
        ids = [gpu.id for gpu in self.gpus]
        for index, gpu_id in enumerate(ids):
            if gpu_id in ids[:index]:
                raise _Problem(f"GPU {gpu_id} is listed twice", at=f"gpus[{index}].id")
        for profile in self.profiles.values():
            unknown = [g for g in profile.gpu if self.gpus and g not in ids]
            if unknown:
                raise _Problem(f"GPU {unknown[0]} is not in gpus ({', '.join(map(str, ids))})",
                               hint="add it to gpus or use gpu: auto",
                               at=f"profiles.{profile.name}.gpu")
        pinned = [p.name for p in self.profiles.values() if p.pinned]
        cap = self.residency.cap
        if cap is not None and len(pinned) > cap:
            raise _Problem(f"{len(pinned)} profiles are pinned ({', '.join(pinned)}) but at "
                           f"most {cap} model(s) may be loaded at once",
                           hint="raise residency.max_models or use residency.mode: budget",
                           at="residency")

    def resolve(self, name: str) -> Profile | Fallback | None:
        """What a client's ``model`` names: a profile by name or alias, else a fallback by
        its name, else a fallback by its upstream model name; None if nothing."""
        profile = self.profiles.get(name)
        if profile is not None:
            return profile
        for profile in self.profiles.values():
            if name in profile.aliases:
                return profile
        for fallback in self.fallbacks:
            if name == fallback.name:
                return fallback
        for fallback in self.fallbacks:
            if name == fallback.model:
                return fallback
        return None

    def answer_timeouts(self, profile: Profile) -> tuple[float, float]:
        """``(first_byte, upstream_idle)`` for ``profile``'s answers: its own, else global."""
        own = profile.timeouts
        return (self.timeouts.first_byte if own.first_byte is None else own.first_byte,
                self.timeouts.upstream_idle if own.upstream_idle is None
                else own.upstream_idle)

    def model_names(self) -> list[str]:
        """Every name a client may use: each profile then its aliases, then fallbacks."""
        names: list[str] = []
        for profile in self.profiles.values():
            names += [profile.name, *profile.aliases]
        return names + [fallback.name for fallback in self.fallbacks]


# --- structuring ---------------------------------------------------------------------

_REQUIRED_HINTS: Mapping[tuple[type, str], str] = FrozenDict({
    (Config, "profiles"): "add at least one profile with a 'model' path",
    (Profile, "model"): "the path of the .gguf file to load",
})


def _reader_of(type_: Any) -> _Reader | None:
    for meta in getattr(type_, "__metadata__", ()):
        if isinstance(meta, _Reader):
            return meta
    return None


def _read_with(reader: _Reader) -> Callable[[Any, Any], Any]:
    return lambda value, _type: reader.read(value)


def _reader_hook(type_: Any) -> Callable[[Any, Any], Any]:
    """The cattrs hook for an ``Annotated[..., _Reader]`` field type."""
    reader = _reader_of(type_)
    if reader is None:
        raise TypeError(f"{type_!r} has no _Reader")
    return _read_with(reader)


def _parse_listen(value: object) -> Listen:
    if isinstance(value, int) and not isinstance(value, bool):
        return Listen(port=_port(value))
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)|(\d+)",
                         value.strip() if isinstance(value, str) else "")
    if match is None:
        raise _Problem(f"expected host:port like 127.0.0.1:9001, [::1]:9001 or :9001, "
                       f"got {_show(value)}", hint="write IPv6 addresses in brackets"
                       if isinstance(value, str) and value.count(":") > 1 else None)
    v6_host, v6_port, host, port, bare_port = match.groups()
    return Listen(host=v6_host or host or _LOOPBACK, port=_port(int(v6_port or port or bare_port)))


def _converter(base_dir: Path | None) -> cattrs.Converter:
    """A converter for one parse: paths resolve against ``base_dir``."""
    conv = cattrs.Converter(forbid_extra_keys=True)

    def structure_class(cl: type) -> Callable[[Any, Any], Any]:
        generated: Callable[[Any, Any], Any] = make_dict_structure_fn(cl, conv)

        def structure(value: object, _type: Any) -> Any:
            if value is None:
                value = {}  # 'timeouts:' with nothing under it: all defaults
            if not isinstance(value, Mapping):
                raise _Problem(f"expected a mapping of settings, got {_show(value)}")
            return generated(value, cl)

        return structure

    structure_listen_mapping = structure_class(Listen)

    def structure_listen(value: object, _type: Any) -> Listen:
        if isinstance(value, Mapping):
            return structure_listen_mapping(value, Listen)  # type: ignore[no-any-return]
        return _parse_listen(value)

    def structure_path(value: object, _type: Any) -> Path:
        text = _nonempty_text(value)
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # '~name/...' for a user this machine does not have
            home = text.split("/", 1)[0]
            raise _Problem(f"{text!r}: there is no user {home[1:]!r} whose home directory "
                           f"{home!r} could mean; write the path out") from None
        return path if path.is_absolute() or base_dir is None else base_dir / path

    def structure_profiles(value: object, _type: Any) -> FrozenDict[str, Profile]:
        if value is None or (isinstance(value, Mapping) and not value):
            raise _Problem("no profiles configured",
                           hint="add at least one profile with a 'model' path")
        if not isinstance(value, Mapping):
            raise _Problem(f"expected a mapping of profile names to profiles, "
                           f"got {_show(value)}")
        profiles: dict[str, Profile] = {}
        errors: list[Exception] = []
        for key, body in value.items():
            name = str(key)
            try:
                profiles[name] = structure_profile(name, body)
            except Exception as error:  # collected and rendered with its path, like cattrs
                error.add_note(IterableValidationNote(f"profile {name!r}", name, Profile))
                errors.append(error)
        if errors:
            raise IterableValidationError("invalid profiles", errors, Mapping)
        return FrozenDict(profiles)

    def structure_profile(name: str, body: object) -> Profile:
        if body is None:
            body = {}
        if not isinstance(body, Mapping):
            raise _Problem(f"expected the profile's settings as a mapping, got {_show(body)}",
                           hint=f"write 'model: {body}' on its own line under '{name}:'"
                           if isinstance(body, str) else None)
        if "name" in body:
            raise _Problem("unknown key 'name'", hint=f"a profile's name is its key, {name!r}")
        return conv.structure({**body, "name": name}, Profile)

    def structure_list(cls: type[T], what: str, hint: str) -> Callable[[Any, Any], tuple[T, ...]]:
        """A list of settings mappings (fallbacks, gpus), each problem with its index."""

        def structure(value: object, _type: Any) -> tuple[T, ...]:
            if value is None:
                return ()
            if not isinstance(value, list):
                raise _Problem(f"expected a list of {what}s, got {_show(value)}", hint=hint)
            items: list[T] = []
            errors: list[Exception] = []
            for index, item in enumerate(value):
                try:
                    items.append(conv.structure(item, cls))
                except Exception as error:  # collected and rendered with its path
                    error.add_note(IterableValidationNote(f"{what} {index}", index, cls))
                    errors.append(error)
            if errors:
                raise IterableValidationError(f"invalid {what}s", errors, tuple)
            return tuple(items)

        return structure

    def strict(check: Callable[[object], Any]) -> Callable[[Any, Any], Any]:
        return lambda value, _type: check(value)

    conv.register_structure_hook(str, strict(_text))
    conv.register_structure_hook(int, strict(_whole_number))
    conv.register_structure_hook(float, strict(_number))
    conv.register_structure_hook(bool, strict(_boolean))
    conv.register_structure_hook(Path, structure_path)
    conv.register_structure_hook_factory(attrs.has, structure_class)
    conv.register_structure_hook(Listen, structure_listen)
    conv.register_structure_hook_func(lambda t: t == Mapping[str, Profile], structure_profiles)
    conv.register_structure_hook_func(
        lambda t: t == tuple[Fallback, ...],
        structure_list(Fallback, "fallback", "start each one with '- name:'"))
    conv.register_structure_hook_func(
        lambda t: t == tuple[Gpu, ...],
        structure_list(Gpu, "gpu", "e.g. gpus: [{id: 0, memory: 24GiB}]"))
    conv.register_structure_hook_factory(lambda t: _reader_of(t) is not None, _reader_hook)
    return conv


def _number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _Problem(f"expected a number, got {_show(value)}")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _Problem(f"expected true or false, got {_show(value)}",
                   hint="only true and false are booleans in swapd's YAML")


def _walk(error: BaseException, path: str) -> Iterator[str]:
    """Every problem inside ``error`` (cattrs' nested groups), as ``message @ path``."""
    if isinstance(error, ClassValidationError):
        with_notes, without = error.group_exceptions()
        for sub, note in with_notes:
            if isinstance(sub, KeyError):
                hint = _REQUIRED_HINTS.get((error.cl, note.name))
                yield (f"missing required key {note.name!r}{_where(path)}"
                       + (f" — {hint}" if hint else ""))
            else:
                yield from _walk(sub, _join(path, note.name))
        for sub in without:
            yield from _walk(sub, path)
    elif isinstance(error, IterableValidationError):
        indexed, unindexed = error.group_exceptions()
        for item, inote in indexed:
            index = inote.index
            yield from _walk(item, _join(path, f"[{index}]" if isinstance(index, int)
                                         else str(index)))
        for item in unindexed:
            yield from _walk(item, path)
    elif isinstance(error, ForbiddenExtraKeysError):
        for key in sorted(error.extra_fields, key=str):
            yield _unknown_key(key, path, error.cl)
    elif isinstance(error, BaseExceptionGroup):
        for member in error.exceptions:
            yield from _walk(member, path)
    elif isinstance(error, _Problem):
        yield error.render(path)
    elif isinstance(error, ValueError | TypeError):
        yield f"{error}{_where(path)}"
    else:
        yield f"{type(error).__name__}: {error}{_where(path)}"


def _unknown_key(key: object, path: str, cl: type) -> str:
    known = [field.name for field in attrs.fields(cl)
             if not (cl is Profile and field.name == "name")]
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.7)
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif cl is Profile:
        hint = "llama-server flags go under 'flags:'"
    else:
        hint = f"known keys here: {', '.join(known)}"
    return f"unknown key {key!r}{_where(path)} — {hint}"


# --- names ---------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9._:/@+-]+")
_NAME_RULE = "use letters, digits and . _ : / @ + - only (no spaces)"


def _name_problems(data: Mapping[Any, Any]) -> list[str]:
    """Malformed or duplicate client-facing names, from the raw YAML.

    Profile names are claimed first, then aliases, then fallback names, so a clash is
    blamed on the alias or fallback rather than on the profile it collides with. Values of
    the wrong type are skipped here; the structuring pass reports those.
    """
    problems: list[str] = []
    owners: dict[str, str] = {}

    def claim(name: object, path: str, owner: str) -> None:
        if not isinstance(name, str):
            problems.append(f"a name must be text, got {_show(name)}{_where(path)}"
                            f" — quote it: '{_show(name)}'")
        elif not _NAME.fullmatch(name):
            problems.append(f"invalid name {name!r}{_where(path)} — {_NAME_RULE}")
        elif name in owners:
            problems.append(f"duplicate name {name!r}{_where(path)} — already used by "
                            f"{owners[name]}")
        else:
            owners[name] = owner

    profiles = data.get("profiles")
    profiles = profiles if isinstance(profiles, Mapping) else {}
    for key in profiles:
        claim(key, "profiles", f"profile '{key}'")
    for key, body in profiles.items():
        aliases = body.get("aliases") if isinstance(body, Mapping) else None
        aliases = [aliases] if isinstance(aliases, str) else aliases
        if isinstance(aliases, list):
            for alias in aliases:
                if isinstance(alias, str):
                    claim(alias, f"profiles.{key}.aliases", f"profile '{key}'")
    fallbacks = data.get("fallbacks")
    for index, fallback in enumerate(fallbacks if isinstance(fallbacks, list) else []):
        name = fallback.get("name") if isinstance(fallback, Mapping) else None
        if isinstance(name, str):
            claim(name, f"fallbacks[{index}].name", f"fallback '{name}'")
    return problems


# --- entry points --------------------------------------------------------------------


def parse_config(text: str, *, source: str = "config", base_dir: Path | None = None) -> Config:
    """The :class:`Config` in YAML ``text``; raises :class:`ConfigError` with every problem.

    ``source`` names the text in the error; relative paths resolve against ``base_dir``
    (the config file's directory), or stay relative to the working directory without one.
    """
    data = _read_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"expected a mapping of settings at the top level, "
                           f"got {_show(data)}"], source=source)
    problems = _name_problems(data)
    try:
        config = _converter(base_dir).structure(data, Config)
    except (BaseValidationError, ValueError) as error:
        problems += _walk(error, "")
    if problems:
        raise ConfigError(problems, source=source)
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path`` (see :func:`parse_config`)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"cannot read the config file: {error.strerror or error}"],
                          source=str(file)) from None
    except UnicodeDecodeError:
        raise ConfigError(["the config file is not UTF-8 text"], source=str(file)) from None
    return parse_config(text, source=str(file), base_dir=file.absolute().parent)


def missing_model_files(config: Config) -> list[str]:
    """A problem for each profile whose model file is not a readable file (now)."""
    problems: list[str] = []
    for profile in config.profiles.values():
        where = f"@ profiles.{profile.name}.model"
        if not profile.model.exists():
            problems.append(f"model file not found: {profile.model} {where}")
        elif not profile.model.is_file():
            problems.append(f"model path is not a file: {profile.model} {where}")
        elif not os.access(profile.model, os.R_OK):
            problems.append(f"model file is not readable: {profile.model} {where}")
    return problems
