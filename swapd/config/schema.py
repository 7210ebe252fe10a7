"""A JSON Schema (draft 2020-12) of swapd's configuration, generated from the code.

:func:`config_schema` walks the attrs classes in :mod:`swapd.config` and maps each
field's type to a schema, so the schema cannot drift from what the loader accepts: a new
field appears in it by itself, and a field of a type this module does not know raises
``TypeError`` (the tests run :func:`config_schema`, so that fails at once). What the
schema cannot generate, the text people read in their editor, is :data:`DESCRIPTIONS`,
keyed like the tables in ``docs/configuration.md``; a test checks it names every field.

The schema is for editors (completion, hover help, red squiggles while typing) and for
CI checks of config files. The loader stays the authority: it also checks what JSON
Schema cannot say (a name used twice, ``backoff_max`` below ``backoff``, two spellings of
one flag), and its messages carry the fix. Where the two could disagree, the schema is
the more lenient one, so an editor never marks a config that swapd would load.

How the types map:

* durations: a number of seconds, or text like ``500ms``, ``30s``, ``2m``, ``1m30s``;
* sizes: a whole number of bytes, or text like ``512KiB``, ``32MiB``, ``1GB``;
* ``listen``: ``HOST:PORT`` text, a bare port, or a ``{host, port}`` mapping;
* ``llama_server.port``: ``"auto"``, ``null`` or a port; ``command``: text or a list;
* ``flags``: a mapping of flag names to text, numbers, booleans, ``null`` or lists;
* every settings mapping has ``additionalProperties: false``, as the loader forbids
  unknown keys; sections may be ``null`` (``timeouts:`` with nothing under it).
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

import attrs

from swapd.config import load, model, problems, readers
from swapd.config.flags import LEGACY_NAMES, SHORT_FORMS, SWAPD_OWNED

__all__ = ["DESCRIPTIONS", "SCHEMA_DIALECT", "config_schema", "schema_text"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

Schema = dict[str, Any]

DESCRIPTIONS: Mapping[str, str] = readers.FrozenDict({
    "listen": "Where swapd serves HTTP: HOST:PORT, [::1]:PORT or :PORT (loopback). "
              "0.0.0.0:9001 serves a LAN: set API keys then.",
    "listen.host": "Address to bind; 0.0.0.0 or :: serve every interface.",
    "listen.port": "Port to bind; 0 picks a free one.",
    "state_dir": "Child log, pidfile, remembered load times, saved prompt caches. Must be "
                 "writable. Default: $STATE_DIRECTORY, else $XDG_STATE_HOME/swapd, else "
                 "~/.local/state/swapd.",
    "ttl": "Unload a model after this long idle (nothing in flight or waiting); 0 = never. "
           "Profiles may override it.",
    "profiles": "The models clients can ask for, by profile name or alias.",
    "fallbacks": "Remote OpenAI-compatible upstreams, tried in order when the local model "
                 "cannot serve (failed start, circuit open).",
    "llama_server": "How swapd runs llama-server.",
    "llama_server.command": "The binary: a name on PATH, a path, or an argv list "
                            "([env, CUDA_VISIBLE_DEVICES=1, llama-server]). Never run "
                            "through a shell, never split on spaces.",
    "llama_server.host": "Where the child listens. Must be loopback: clients only reach "
                         "it through swapd.",
    "llama_server.port": "auto: a free loopback port for each start; or a fixed port, "
                         "checked free before spawning.",
    "llama_server.env": "Variables added to swapd's environment for the child (never "
                        "replacing it).",
    "timeouts": "Deadlines.",
    "timeouts.start": "Until the child answers /health with 200; then the start failed.",
    "timeouts.stop": "SIGTERM grace, then SIGKILL of the child's process group.",
    "timeouts.queue_wait": "Longest a request waits for its model; then 504.",
    "timeouts.drain": "How long in-flight requests may finish before a swap or shutdown "
                      "cuts them.",
    "timeouts.health_interval": "Readiness poll interval while a model loads (the "
                                "child's 'listening' line also wakes the poll).",
    "timeouts.health_check": "Liveness of a ready model: probe its /health once it sent "
                             "nothing for this long; 3 unanswered probes in a row = hung, "
                             "killed and restarted like a crash. 0 = off.",
    "timeouts.health_check_timeout": "Deadline of each liveness probe.",
    "timeouts.first_byte": "Longest silence of llama-server before an answer's body "
                           "begins (prompt processing; a whole non-streamed answer); "
                           "then 502.",
    "timeouts.upstream_idle": "Longest silence between reads once an answer's body has "
                              "begun; then 502 or an in-band error.",
    "timeouts.body": "A request's whole body must arrive within this; then 408.",
    "timeouts.send": "A client that reads nothing of its answer for this long is cut off "
                     "and its model lease returns.",
    "timeouts.headers": "A connection must send a complete request head within this; "
                        "also the keep-alive idle time.",
    "queue": "Requests waiting for a model.",
    "queue.max_waiting": "Requests that may wait for a model in all; the next gets 429 "
                         "with Retry-After.",
    "queue.starvation_bound": "How long a busy model keeps taking new requests while "
                              "another model's requests wait; then swapd swaps.",
    "restart": "Failed starts and crashes: backoff and circuit breaker, per profile.",
    "restart.max_failures": "Consecutive failed starts or crashes of one profile that "
                            "open its circuit.",
    "restart.cooldown": "How long an open circuit refuses local starts before one trial "
                        "start.",
    "restart.backoff": "Delay before restarting a profile after its first failure; "
                       "doubles each time.",
    "restart.backoff_max": "The longest restart delay.",
    "restart.stable_after": "How long a start must stay up before the profile's failures "
                            "are forgotten; crashing sooner keeps counting.",
    "progress": "Load progress on waiting streaming chat requests.",
    "progress.reasoning": "Send load progress as reasoning_content chunks ('[swapd] "
                          "loading qwen: 40%'); false leaves only SSE comments.",
    "progress.keepalive": "Interval of SSE comments (': swapd loading ...') while a "
                          "request waits.",
    "logs": "The child's output.",
    "logs.max_bytes": "The child's log file in state_dir is rotated to .1 past this size.",
    "logs.tail_lines": "Lines kept in memory for /swapd/logs and error messages.",
    "security": "API keys and request limits.",
    "security.api_key_env": "Environment variable holding the API key(s) every client "
                            "must send (commas or spaces separate several).",
    "security.api_key_file": "Or a file with one key per line (# comments allowed).",
    "security.admin_key_env": "Key(s) for /swapd/* and /metrics; without them those take "
                              "an API key.",
    "security.admin_key_file": "Or a file of admin keys, one per line.",
    "security.max_body": "Larger request bodies get 413.",
    "security.max_pending_bodies": "Memory for request bodies still arriving, all "
                                   "requests together; past it 503 with Retry-After. "
                                   "Default: twice max_body.",
    "cors": "Which web pages (origins) may call swapd from a browser.",
    "cors.allow_origins": "'*', or exact origins ('https://chat.example.com') echoed "
                          "back with Vary: Origin; [] turns CORS off. Unset: '*' when "
                          "API keys are set, else pages on this machine (localhost, "
                          "127.0.0.1, [::1], any port) only.",
    "cache": "Warm return: prompt caches saved before a swap, restored after.",
    "cache.keep": "Save each profile's prompt caches before it is swapped out and restore "
                  "them when it comes back; a profile's keep_cache overrides this.",
    "cache.budget": "Disk space for saved caches in state_dir/slots; least recently used "
                    "go first.",
    "cache.min_tokens": "Slots holding fewer tokens are not saved.",
    "memory": "VRAM estimates per profile.",
    "memory.gpu": "GPU memory to judge each profile's estimate against (24GiB). Default: "
                  "what nvidia-smi reports.",
    "memory.guard": "Refuse to start a profile whose estimate does not fit, instead of "
                    "letting llama-server die of OOM.",
    "profiles.NAME": "One model clients can ask for: a GGUF file plus llama-server flags.",
    "profiles.NAME.model": "The GGUF file; relative paths are relative to the config file.",
    "profiles.NAME.display_name": "Shown by probes and the status page. Default: the name.",
    "profiles.NAME.aliases": "Other names clients may use for this profile.",
    "profiles.NAME.ttl": "This profile's idle unload; default: the global ttl.",
    "profiles.NAME.env": "Variables added to the child's environment for this profile.",
    "profiles.NAME.flags": "llama-server flags. Dashes optional, _ becomes -; true = bare "
                           "flag, false/null = left out, a list repeats the flag. model, "
                           "host and port are swapd's own.",
    "profiles.NAME.description": "Free text for people.",
    "profiles.NAME.keep_cache": "Warm return for this profile; default: cache.keep.",
    "profiles.NAME.timeouts": "This profile's own answer deadlines; unset keys take the "
                              "global timeouts.",
    "profiles.NAME.timeouts.first_byte": "Longest silence before an answer's body begins, "
                                         "for this profile.",
    "profiles.NAME.timeouts.upstream_idle": "Longest silence between reads of an answer, "
                                            "for this profile.",
    "fallbacks[]": "A remote OpenAI-compatible upstream.",
    "fallbacks[].name": "A name clients may also ask for directly.",
    "fallbacks[].base_url": "The upstream's OpenAI base URL, like "
                            "https://openrouter.ai/api/v1.",
    "fallbacks[].model": "The upstream's model name; requests are rewritten to it.",
    "fallbacks[].api_key_env": "Environment variable holding the upstream's key (never "
                               "the client's, never logged).",
    "fallbacks[].timeout": "Connect and health-check timeout.",
    "gpus": "The GPUs swapd may load models on, each with the memory models may use. "
            "Default: one GPU, id 0, sized by memory.gpu or nvidia-smi.",
    "gpus[]": "One GPU.",
    "gpus[].id": "The device id, as CUDA_VISIBLE_DEVICES and --device count them.",
    "gpus[].memory": "The GPU's memory (24GiB); residency.reserve is kept free of it.",
    "residency": "How many models stay loaded at once (docs/residency.md).",
    "residency.mode": "count: at most max_models at once; budget: each GPU's memory "
                      "decides which models fit together.",
    "residency.max_models": "The most models loaded at once. Default: 1 with mode count "
                            "(one at a time), no cap with mode budget.",
    "residency.reserve": "Memory per GPU that no plan uses (display, other programs).",
    "profiles.NAME.pinned": "Loaded at start and never evicted to make room for another.",
    "profiles.NAME.preload": "Loaded at start; evictable like any other model.",
    "profiles.NAME.gpu": "auto (any one GPU), a GPU id, or a list of ids to split the "
                         "model across (--tensor-split).",
    "profiles.NAME.memory": "The model's footprint on the GPU, for models the GGUF "
                            "estimate cannot size; overrides the estimate.",
})
"""Hover text per config key, spelled like the keys in ``docs/configuration.md``."""


# --- scalar schemas, built from the loader's own patterns ---------------------------

def _duration_pattern() -> str:
    number = readers._NUMBER
    units = "|".join(sorted(readers._DURATION_UNITS, key=len, reverse=True))
    return rf"^\s*(?:{number}|(?:{number}(?:{units}))+)\s*$"


def _size_pattern() -> str:
    def any_case(unit: str) -> str:
        return "".join(f"[{c.upper()}{c.lower()}]" for c in unit)

    units = "|".join(any_case(u) for u in sorted(readers._SIZE_UNITS, key=len, reverse=True))
    return rf"^\s*{readers._NUMBER}\s*(?:{units})?\s*$"


def _duration(*, positive: bool) -> Schema:
    number: Schema = {"type": "number", "minimum": 0}
    if positive:
        number = {"type": "number", "exclusiveMinimum": 0}
    return {"anyOf": [number, {"type": "string", "pattern": _duration_pattern()}],
            "examples": ["500ms", "30s", "2m", "1m30s"]}


def _size(*, positive: bool) -> Schema:
    whole: Schema = {"type": "integer", "exclusiveMinimum": 0} if positive else {
        "type": "integer", "minimum": 0}
    return {"anyOf": [whole, {"type": "string", "pattern": _size_pattern()}],
            "examples": ["512KiB", "32MiB", "20GiB"]}


def _owned_flag_names() -> list[str]:
    """Every spelling of the flags swapd passes itself (an error in ``flags``)."""
    names = set(SWAPD_OWNED)
    names |= {short for short, long in SHORT_FORMS.items() if long in SWAPD_OWNED}
    names |= {legacy for legacy, long in LEGACY_NAMES.items() if long in SWAPD_OWNED}
    return sorted(names)


_FLAG_SCALAR: Schema = {"type": ["string", "number"]}

_FLAGS: Schema = {
    "type": ["object", "null"],
    "propertyNames": {
        "pattern": r"^\s*-*[A-Za-z0-9][A-Za-z0-9._-]*\s*$",
        "not": {"pattern": rf"^\s*-*({'|'.join(map(re.escape, _owned_flag_names()))})\s*$"},
    },
    "additionalProperties": {
        "anyOf": [{"type": ["string", "number", "boolean", "null"]},
                  {"type": "array", "items": _FLAG_SCALAR}],
    },
}

_ENV: Schema = {
    "type": ["object", "null"],
    "propertyNames": {"pattern": f"^{readers.ENV_NAME.pattern}$"},
    "additionalProperties": {"type": ["string", "number"]},
}

_NAME: Schema = {"type": "string", "pattern": f"^{problems._NAME.pattern}$"}
_ORIGIN: Schema = {"type": "string",  # readers._ORIGIN, without Python's IGNORECASE flag
                   "pattern": "^([*]|null|[A-Za-z][A-Za-z0-9+.-]*://[^/?#\\s]+)$"}

_PORT: Schema = {"type": "integer", "minimum": 0, "maximum": 65535}

_READERS: Mapping[Any, Schema] = readers.FrozenDict({
    readers.Seconds: _duration(positive=False),
    readers.PositiveSeconds: _duration(positive=True),
    readers.Count: {"type": "integer", "minimum": 0},
    readers.PositiveCount: {"type": "integer", "minimum": 1},
    readers.PositiveBytes: _size(positive=True),
    readers.Bytes: _size(positive=False),
    readers.GpuChoice: {"anyOf": [{"const": "auto"}, {"type": "null"},
                              {"type": "integer", "minimum": 0},
                              {"type": "array", "minItems": 1, "uniqueItems": True,
                               "items": {"type": "integer", "minimum": 0}}]},
    readers.Port: _PORT,
    readers.EnvName: {"type": "string", "pattern": f"^{readers.ENV_NAME.pattern}$"},
    readers.Env: _ENV,
    readers.Flags: _FLAGS,
    readers.Names: {"anyOf": [_NAME, {"type": "array", "items": _NAME}]},
    readers.Origins: {"anyOf": [_ORIGIN, {"type": "array", "items": _ORIGIN}]},
})
"""The shared field types of :mod:`swapd.config` (``Annotated`` aliases) and their schema."""

_READ_FUNCTIONS: Mapping[Any, Schema] = readers.FrozenDict({
    readers._read_command: {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": _FLAG_SCALAR}]},
    readers._loopback_host: {"type": "string",
                         "examples": ["127.0.0.1", "::1", "localhost"]},
    readers._child_port: {"anyOf": [{"const": "auto"}, {"type": "null"},
                                {"type": "integer", "minimum": 1, "maximum": 65535}]},
    readers._http_url: {"type": "string", "pattern": "^\\s*https?://[^/\\s]+"},
    readers._nonempty_text: {"type": "string", "pattern": "\\S"},
    readers._read_mode: {"anyOf": [{"const": "count"}, {"const": "budget"}]},
})
"""Readers written for one field (``Annotated[..., _Reader(fn)]``), by function."""

_LISTEN_TEXT: Schema = {"type": "string",
                        "pattern": r"^\s*(?:\[[^\]]+\]:\d+|[^:\[\]]*:\d+|\d+)\s*$",
                        "examples": ["127.0.0.1:9001", "0.0.0.0:9001", "[::1]:9001", ":9001"]}


# --- the walk ------------------------------------------------------------------------

def config_schema() -> dict[str, Any]:
    """The JSON Schema of a swapd config file, as a JSON-ready dict."""
    defs: dict[str, Schema] = {}
    root = _class_schema(model.Config, "", defs)
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "swapd configuration",
        "description": "swapd's YAML config: see docs/configuration.md. Validate a file "
                       "with 'swapd check CONFIG'.",
        **root,
        "$defs": defs,
    }


def schema_text() -> str:
    """:func:`config_schema` as indented JSON text, ending in a newline (``swapd schema``)."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


def _class_schema(cls: type, path: str, defs: dict[str, Schema]) -> Schema:
    """An attrs class as an object schema (``path`` is its key, '' at the top level)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    properties: dict[str, Schema] = {}
    required: list[str] = []
    for field in attrs.fields(cls):
        if cls is model.Profile and field.name == "name":
            continue  # a profile's name is its key under 'profiles'
        key = _join(path, field.name)
        properties[field.name] = _describe(_field_type(hints[field.name], key, defs), key,
                                           field.default)
        if field.default is attrs.NOTHING:
            required.append(field.name)
    schema: Schema = {"type": "object", "properties": properties,
                      "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _field_type(hint: Any, key: str, defs: dict[str, Schema]) -> Schema:
    if hint in _READERS:
        return dict(_READERS[hint])
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        reader = load._reader_of(hint)
        if reader is not None and reader.read in _READ_FUNCTIONS:
            return dict(_READ_FUNCTIONS[reader.read])
        raise TypeError(f"{key}: no JSON Schema for the config reader {hint!r}; "
                        "add it to swapd/config/schema.py")
    if origin in (typing.Union, UnionType):
        options = [a for a in args if a is not NoneType]
        if len(options) == 1 and len(args) == 2:
            inner = _field_type(options[0], key, defs)
            return {"anyOf": [inner, {"type": "null"}]}
    if hint is model.Listen:
        listen = _named(model.Listen, key, defs, nullable=False)
        return {"anyOf": [_LISTEN_TEXT, _PORT, listen]}
    if attrs.has(hint):
        return _section(hint, key, defs)
    if origin is Mapping and args == (str, model.Profile):
        profile = _named(model.Profile, f"{key}.NAME", defs, nullable=False)
        profile["description"] = DESCRIPTIONS[f"{key}.NAME"]
        return {"type": "object", "minProperties": 1, "propertyNames": _NAME,
                "additionalProperties": profile}
    if origin is tuple and len(args) == 2 and args[1] is ... and attrs.has(args[0]):
        item = _named(args[0], f"{key}[]", defs, nullable=False)
        item["description"] = DESCRIPTIONS[f"{key}[]"]
        return {"type": ["array", "null"], "items": item}
    simple: dict[Any, Schema] = {str: {"type": "string"}, bool: {"type": "boolean"},
                                 int: {"type": "integer"}, float: {"type": "number"},
                                 Path: {"type": "string", "minLength": 1}}
    if hint in simple:
        return dict(simple[hint])
    raise TypeError(f"{key}: no JSON Schema for the config type {hint!r}; "
                    "add it to swapd/config/schema.py")


def _section(cls: type, key: str, defs: dict[str, Schema]) -> Schema:
    """A settings mapping that may also be empty (``timeouts:`` alone means defaults)."""
    return _named(cls, key, defs, nullable=True)


def _named(cls: type, key: str, defs: dict[str, Schema], *, nullable: bool) -> Schema:
    name = cls.__name__
    if name not in defs:
        defs[name] = _class_schema(cls, key, defs)
        if nullable:
            defs[name]["type"] = ["object", "null"]
    return {"$ref": f"#/$defs/{name}"}


def _describe(schema: Schema, key: str, default: Any) -> Schema:
    described = dict(schema)
    text = DESCRIPTIONS.get(key)
    if text is not None:
        described["description"] = text
    plain = _json_default(default)
    if plain is not _NO_DEFAULT:
        described["default"] = plain
    return described


_NO_DEFAULT = object()


def _json_default(value: Any) -> Any:
    """A field's default as JSON, or ``_NO_DEFAULT`` where it is computed (factories)."""
    if value is attrs.NOTHING or isinstance(value, attrs.Factory):  # type: ignore[arg-type]
        return _NO_DEFAULT
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return _NO_DEFAULT


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
