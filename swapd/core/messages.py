"""What goes in and out of the supervisor's loop.

In: the messages on its one channel (requests' ``Acquire``/``Release``/``Withdraw``,
operators' ``Unload``/``Load``/``Shutdown``/``Kill``/``Reload``, and the reports of its
own helper tasks). Out: the typed facts it publishes on its events (:class:`Loaded`,
:class:`Swapped`, :class:`Evicted`, :class:`LoadFailed`, :class:`Crashed`), the one
source for metrics, status and the events stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from swapd.config import Config, Profile
from swapd.core import process
from swapd.core.child import Lease, Waiter
from swapd.core.footprint import Footprint
from swapd.errors import LeaseError, StartError

# -- facts the supervisor publishes (frozen; the one source for metrics and status) --

@attrs.frozen
class Loaded:
    profile: str
    gpus: tuple[int, ...]
    load_s: float
    context: int | None = None  # per request, as the child reports it (None: it did not)


@attrs.frozen
class Swapped:
    """A load that needed a stop first: ``from_`` were stopped to make room for ``to``."""

    from_: tuple[str, ...]
    to: str
    stop_s: float
    load_s: float


@attrs.frozen
class Evicted:
    profile: str
    reason: str  # one of EVICTION_REASONS


@attrs.frozen
class LoadFailed:
    profile: str
    message: str
    exit_code: int | None
    swap: bool  # a stop was made to make room for it


@attrs.frozen
class Crashed:
    profile: str
    exit_code: int | None
    hung: bool


Fact = Loaded | Swapped | Evicted | LoadFailed | Crashed


# -- messages on the supervisor's channel --

@attrs.frozen
class Acquire:
    name: str | None
    waiter: Waiter


@attrs.frozen
class Release:
    lease: Lease


@attrs.frozen
class Withdraw:
    waiter: Waiter


@attrs.frozen
class Unload:
    done: trio.Event
    name: str | None = None  # None: every resident model but the pinned ones


@attrs.frozen
class Load:
    """Load a model without holding it: an internal want, like a preload's."""

    name: str
    reply: trio.MemorySendChannel[LeaseError | None]


@attrs.frozen
class KeepAlive:
    """A client set how long ``name`` stays loaded once idle (Ollama's ``keep_alive``)."""

    name: str
    seconds: float | None  # 0: unload once idle; inf: never; None: the profile's TTL


@attrs.frozen
class Kill:
    """Kill every child now (a second SIGTERM): a stop, not a crash."""


@attrs.frozen
class Shutdown:
    pass


@attrs.frozen
class Reload:
    config: Config
    reply: trio.MemorySendChannel[dict[str, Any] | LeaseError]


@attrs.frozen
class Checked:
    """The preflight of ``profile`` is done: None, or why it cannot start."""

    profile: Profile
    problem: str | None


@attrs.frozen
class StartDone:
    profile: Profile
    proc: process.LlamaProcess | None
    error: StartError | None
    context: int | None = None  # the child's own per-request context


@attrs.frozen
class Measured:
    """The ready ``proc`` reported these buffers (llama-server's buffer lines)."""

    proc: process.LlamaProcess
    footprint: Footprint


@attrs.frozen
class Sized:
    """The footprint of ``profile`` (bytes), and where it came from."""

    profile: Profile
    footprint: int
    source: str  # "measured", "memory", "estimate", "gpu"
    estimate: int | None
    measured: int | None


@attrs.frozen
class Phase:
    """A start or stop task says what it is doing now (for progress messages)."""

    text: str | None
    profile: str | None = None


@attrs.frozen
class Stopped:
    proc: process.LlamaProcess


@attrs.frozen
class Exited:
    proc: process.LlamaProcess


@attrs.frozen
class Hung:
    """The ready ``proc`` left ``HEALTH_MISSES`` liveness probes in a row unanswered."""

    proc: process.LlamaProcess
    why: str


Launcher = Callable[[Config, Profile, "process.ChildLog | None", Sequence[str]],
                    process.LlamaProcess]
"""Spawns a profile's child; tests pass one that makes fake processes on fake time."""

Message = (Acquire | Release | Withdraw | Unload | Load | KeepAlive | Kill | Shutdown
           | Reload | Checked | Sized | StartDone | Measured | Phase | Stopped | Exited | Hung)


@attrs.frozen
class Event:
    """A fact published for status, the events stream and metrics."""

    seq: int
    at: float  # wall clock, for people
    kind: str
    data: dict[str, Any]
    fact: Fact | None = None
