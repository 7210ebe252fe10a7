"""The manifest as frozen attrs classes: :class:`Config`, :class:`Profile` and their sections.

What the rest of swapd reads. Defaults live here; how raw YAML becomes these classes is
:mod:`swapd.config.load`'s job, and the per-field rules are in :mod:`swapd.config.readers`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated

import attrs

from swapd.config.flags import FlagValue, canonical_flag
from swapd.config.readers import (
    _LOOPBACK,
    Bytes,
    Count,
    Env,
    EnvName,
    Flags,
    FrozenDict,
    GpuChoice,
    Names,
    Origins,
    Port,
    PositiveBytes,
    PositiveCount,
    PositiveSeconds,
    Seconds,
    _child_port,
    _http_url,
    _loopback_host,
    _nonempty_text,
    _Problem,
    _read_command,
    _read_mode,
    _Reader,
)

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
