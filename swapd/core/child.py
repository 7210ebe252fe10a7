"""The records the supervisor keeps, one per child and per profile, and their rules.

A child's state machine (:class:`State`, the transitions it may make), the leases it has
granted, the requests waiting for it (:class:`Waiter`) and each profile's failure record
(:class:`ProfileHealth`). Only the supervisor's loop changes them
(``Supervisor._transition`` checks each move against ``allowed``); everything else reads
snapshots.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import attrs
import trio

from swapd.config import Profile
from swapd.core import process
from swapd.core.footprint import Footprint
from swapd.errors import LeaseError


class State(enum.Enum):
    IDLE = "idle"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


_TRANSITIONS: dict[State, frozenset[State]] = {
    # Each child's machine (one per profile that has a process or a start under way).
    # IDLE and FAILED are also what a profile with no child is in.
    State.IDLE: frozenset({State.STARTING}),
    # STOPPING: a start cancelled by unload, shutdown or a reload, or an out-of-memory
    # start that is retried once after evicting idle models (no failure counted).
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPING}),
    # FAILED: the child crashed or hung while serving. Draining is a sub-state of READY
    # (``Child.draining_since``): no new grants, stopped when its leases are back.
    State.READY: frozenset({State.STOPPING, State.FAILED}),
    # IDLE: the process is gone; the child is forgotten.
    State.STOPPING: frozenset({State.IDLE}),
    # STARTING: a retry; IDLE: an unload clears the failure state (not its circuit).
    State.FAILED: frozenset({State.STARTING, State.IDLE}),
}

def allowed(old: State, new: State) -> bool:
    """Whether a child's machine may move from ``old`` to ``new``."""
    return new in _TRANSITIONS[old]


EVICTION_REASONS = ("room", "ttl", "unload", "reload", "shutdown", "oom")
"""Why a resident model was stopped (``Evicted.reason``, ``swapd_evictions_total``)."""

class IllegalTransition(RuntimeError):
    pass


@attrs.define(eq=False)
class Lease:
    """The right to send one request to one running child.

    The supervisor revokes it by cancelling ``scope`` (drain deadline passed, the child
    crashed, shutdown); the holder runs its upstream I/O inside that scope.
    """

    profile: Profile
    proc: process.LlamaProcess
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    revoked_because: str | None = None


@attrs.define(eq=False)
class Waiter:
    """A request waiting for its model; the supervisor answers it exactly once."""

    profile: str
    enqueued: float
    reply: trio.MemorySendChannel[Lease | LeaseError]
    answered: bool = False
    lease: Lease | None = None
    ready_only: bool = False  # ``try_lease``: grant now or refuse, never queue or load
    internal: bool = False  # a pinned/preload want at start: nobody reads the reply


@attrs.define(eq=False)
class Child:
    """One llama-server the supervisor runs (or is starting, draining, stopping).

    Its ``state`` moves only through ``Supervisor._transition``; ``draining_since`` set
    on a READY child is the draining sub-state: no new grants, and it is stopped once its
    leases are back (or cut at ``timeouts.drain``).
    """

    profile: Profile
    state: State = State.IDLE
    proc: process.LlamaProcess | None = None
    leases: set[Lease] = attrs.field(factory=set)
    draining_since: float | None = None
    drain_reason: str | None = None  # one of EVICTION_REASONS
    idle_since: float = 0.0
    last_used: float = 0.0  # trio time of the last grant or release
    use_seq: int = 0  # the same, as a strict order (ties in time are common in bursts)
    start_scope: trio.CancelScope | None = None
    start_began: float | None = None
    usage: dict[int, int] = attrs.field(factory=dict)  # planned bytes per GPU id
    swap: dict[str, Any] = attrs.field(factory=dict)  # from, began, stopped: its load record
    room_for: str | None = None  # stopped to make room for this profile
    measured: Footprint | None = None
    keep_alive: float | None = None  # a client's idle time (``keep_alive``); None: the TTL

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def gpus(self) -> tuple[int, ...]:
        return tuple(sorted(self.usage))


@attrs.define
class ProfileHealth:
    """Consecutive failures of one profile, its restart backoff and its circuit.

    Per profile, not global: a profile with a bad flag or a context too big for the GPU
    must not stop the healthy ones from loading. A successful start closes an open
    circuit but does not forget the failures: only a run of ``restart.stable_after``
    does, so a child that loads and then crashes on its first request keeps counting
    and opens the circuit (instead of a reload and a 502 per request, forever).
    """

    failures: int = 0
    retry_at: float = -math.inf  # no start before this (backoff)
    opened_at: float | None = None  # circuit open since
    last_error: str | None = None
    exit_code: int | None = None  # of the last failed start or child (None: none left)

    def circuit(self, now: float, cooldown: float) -> str:
        if self.opened_at is None:
            return "closed"
        return "open" if now < self.opened_at + cooldown else "half_open"
