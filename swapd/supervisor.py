"""The supervisor: the one owner of the llama-server process and of what it serves.

A single trio task (``Supervisor.run``) owns the state machine, the child, the in-flight
leases and the waiting queue. Everything else talks to it through one bounded memory
channel: requests send ``Acquire``/``Release``/``Withdraw``, operators ``Unload``/
``Shutdown``, and the supervisor's own helper tasks report ``Checked``, ``StartDone``,
``Stopped``, ``Exited`` and ``Hung``. Preflights, starts and stops run in helper tasks so
the loop keeps answering (and queueing) while a model loads.

A ready child is also watched for life (``_probe_health``): one that sent nothing for
``timeouts.health_check`` is asked ``/health``, and ``HEALTH_MISSES`` unanswered probes
in a row make it ``Hung``: it is killed and handled like a crash (leases revoked, backoff,
circuit), because a stopped or deadlocked llama-server never exits by itself.

Scheduling, in one function (``_schedule``):

* a request for the ready model is granted at once;
* a request for another model first waits for that profile's preflight (a helper task:
  model file, flag names; see ``preflight.py``), so that nothing is drained or stopped
  for a profile that cannot start: one that fails it is answered at once (503, its
  circuit counts it, fallbacks may serve it) and the running model never notices;
* while another model's requests wait, the ready model keeps taking newcomers only until
  the oldest of those has waited ``queue.starvation_bound``; then it drains (in-flight
  requests finish, bounded by ``timeouts.drain``) and is stopped;
* the next model is the one whose oldest waiting request has waited longest, and every
  request waiting for it is served together (ABCABC costs three loads, not six).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from . import process
from .config import Config, Profile
from .errors import (
    CircuitOpen,
    LeaseError,
    LocalFailed,
    ModelCrashed,
    ModelHung,
    NoModelLoaded,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    StartError,
    StartFailed,
    UnknownModel,
)
from .estimate import detect_gpu_memory, estimate_profile, format_bytes, suggest_fix
from .preflight import Preflight, PreflightCheck
from .slotcache import SLOT_TIMEOUT, SlotCache
from .statedir import WriteErrors

log = logging.getLogger(__name__)

HEALTH_MISSES = 3
"""Liveness probes in a row a ready child may leave unanswered before it counts as hung."""


UNLOAD_MARGIN = 10.0
"""Seconds an unload may take beyond its drain, cache save and stop grace (the stop's
own SIGKILL and reap) before ``unload`` reports that it did not finish."""


class State(enum.Enum):
    IDLE = "idle"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


_TRANSITIONS: dict[State, frozenset[State]] = {
    State.IDLE: frozenset({State.STARTING}),
    # STOPPING: a start cancelled by unload or shutdown.
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPING}),
    # FAILED: the child crashed while serving.
    State.READY: frozenset({State.STOPPING, State.FAILED}),
    State.STOPPING: frozenset({State.IDLE}),
    State.FAILED: frozenset({State.STARTING, State.IDLE}),
}


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

    def circuit(self, now: float, cooldown: float) -> str:
        if self.opened_at is None:
            return "closed"
        return "open" if now < self.opened_at + cooldown else "half_open"


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


@attrs.frozen
class Phase:
    """A start or stop task says what it is doing now (for progress messages)."""

    text: str | None


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

Message = (Acquire | Release | Withdraw | Unload | Shutdown | Reload | Checked | StartDone
           | Phase | Stopped | Exited | Hung)


@attrs.frozen
class Event:
    """A fact published for status, the events stream and metrics."""

    seq: int
    at: float  # wall clock, for people
    kind: str
    data: dict[str, Any]


class Supervisor:
    """Owns the child and the state machine. See the module docstring."""

    def __init__(self, config: Config, *, child_log: process.ChildLog | None = None,
                 launcher: Launcher = process.launch,
                 clock: Callable[[], float] = time.time,
                 preflight: PreflightCheck | None = None) -> None:
        self.config = config
        self._launch = launcher
        self._preflight = preflight or Preflight()
        self.child_log = child_log
        self.state_writes = child_log.errors if child_log is not None else WriteErrors()
        """Failed writes into state_dir (log, pidfile, load times, caches): never fatal."""
        self.state = State.IDLE
        self.active: Profile | None = None
        self.proc: process.LlamaProcess | None = None
        self.last_error: StartError | ModelCrashed | None = None
        self.last_error_at: float | None = None  # wall clock
        self.events: deque[Event] = deque(maxlen=256)
        self.load_seconds: dict[str, float] = _read_load_times(config)
        self.stats = {"swaps": 0, "starts_failed": 0, "crashes": 0, "hangs": 0}
        self.health: dict[str, ProfileHealth] = {}
        self.slots = SlotCache(config.state_dir / "slots", config, self.state_writes)
        self.phase: str | None = None
        """What the running start or stop is doing, when it is more than starting."""
        self.history: deque[dict[str, Any]] = deque(maxlen=50)
        """The last loads: from, to, stop/load/total seconds, result (status, the UI)."""
        self._swap: dict[str, Any] = {}
        self._wall = clock
        self._seq = 0
        self._changed = trio.Event()
        self._send, self._receive = trio.open_memory_channel[Message](
            max(64, 4 * config.queue.max_waiting))
        self._leases: set[Lease] = set()
        self._waiting: dict[str, deque[Waiter]] = {}
        self._checking: set[str] = set()  # profiles whose preflight runs now
        self._cleared: dict[str, Profile] = {}  # passed it; the next start consumes it
        self._draining_since: float | None = None
        self._idle_since = 0.0
        self._start_began: float | None = None
        self._start_scope: trio.CancelScope | None = None
        self._unloads: list[trio.Event] = []
        self._unload_requested = False
        self._shutting_down = False
        self._nursery: trio.Nursery | None = None
        self._detected_gpu: int | None = None

    # ------------------------------------------------------------------ public API

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``shutdown()``; the child is stopped before this returns."""
        self._idle_since = trio.current_time()
        # Under open_server's lock on state_dir: what an earlier swapd left there is stale.
        await process.reap_leftovers(self.config.state_dir, self.config.timeouts.stop)
        if self.config.memory.guard and self.config.memory.gpu is None:
            self._detected_gpu = await trio.to_thread.run_sync(detect_gpu_memory)
            if self._detected_gpu is None:
                log.warning("memory.guard is on but the GPU memory is unknown (no nvidia-smi);"
                            " set memory.gpu")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._loop()
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop_now()
                nursery.cancel_scope.cancel()
                self._publish("shutdown")  # the last event: followers can stop here

    @asynccontextmanager
    async def lease(self, name: str | None, *,
                    queue_wait: float | None = None) -> AsyncIterator[Lease]:
        """Hold the named profile's child for one request (loading it if needed)."""
        lease = await self.acquire(name, queue_wait=queue_wait)
        try:
            yield lease
        finally:
            await self.release(lease)

    async def acquire(self, name: str | None, *, queue_wait: float | None = None) -> Lease:
        """Wait for a lease on ``name`` (a profile name or alias; None = the active one).

        Raises a ``LeaseError``: ``QueueFull``, ``QueueTimeout`` after ``queue_wait``
        (default ``timeouts.queue_wait``), ``Unavailable`` when the start failed.
        A caller cancelled while waiting leaves the queue; the load it caused goes on.
        """
        wait = self.config.timeouts.queue_wait if queue_wait is None else queue_wait
        reply_send, reply_receive = trio.open_memory_channel[Lease | LeaseError](1)
        waiter = Waiter(name or "", trio.current_time(), reply_send)
        try:
            await self._send.send(Acquire(name, waiter))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ShuttingDown() from None
        try:
            with trio.move_on_after(wait) as timer:
                result = await reply_receive.receive()
        except BaseException:
            await self._post_shielded(Withdraw(waiter))
            raise
        if timer.cancelled_caught:
            await self._post_shielded(Withdraw(waiter))
            raise QueueTimeout(waiter.profile or "?", wait)
        if isinstance(result, LeaseError):
            raise result
        return result

    async def release(self, lease: Lease) -> None:
        await self._post_shielded(Release(lease))

    async def unload(self) -> bool:
        """Stop the running model once its in-flight requests are done.

        Bounded by the drain, the stop grace and a cache save; False if that passed.
        """
        done = trio.Event()
        try:
            await self._send.send(Unload(done))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True
        with trio.move_on_after(self.unload_timeout):
            await done.wait()
        return done.is_set()

    @property
    def unload_timeout(self) -> float:
        """The longest an unload may take: drain, a cache save, the stop grace."""
        timeouts = self.config.timeouts
        return timeouts.drain + timeouts.stop + SLOT_TIMEOUT + UNLOAD_MARGIN

    async def reload(self, config: Config) -> dict[str, Any]:
        """Adopt a new, already validated config; returns what changed.

        The running model keeps serving if its profile and the llama_server settings
        are unchanged. A changed one keeps serving until the next swap; a removed one is
        unloaded once idle. Requests waiting for a removed profile get 404.
        """
        reply_send, reply_receive = trio.open_memory_channel[dict[str, Any] | LeaseError](1)
        try:
            await self._send.send(Reload(config, reply_send))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ShuttingDown() from None
        result = await reply_receive.receive()  # always answered, by the loop or its exit
        if isinstance(result, LeaseError):
            raise result
        return result

    async def shutdown(self) -> None:
        """Ask ``run`` to drain, stop the child and return."""
        await self._post_shielded(Shutdown())

    async def wait_changed(self) -> None:
        """Return at the next published event (state change, queue change, failure)."""
        await self._changed.wait()

    def next_change(self) -> trio.Event:
        """The event the next publication sets: take it *before* an await that could
        miss a publication, wait on it after."""
        return self._changed

    @property
    def n_waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    @property
    def n_inflight(self) -> int:
        return len(self._leases)

    def waiting_by_profile(self) -> dict[str, int]:
        return {name: len(q) for name, q in self._waiting.items() if q}

    def load_progress(self) -> tuple[float, float | None]:
        """Seconds since the current start began, and the expected total if known."""
        if self.state is not State.STARTING or self._start_began is None or self.active is None:
            return 0.0, None
        return trio.current_time() - self._start_began, self.load_seconds.get(self.active.name)

    def status(self) -> dict[str, Any]:
        """What ``/swapd/status`` shows: a read-only view computed on demand."""
        proc = self.proc
        error = self.last_error
        elapsed, expected = self.load_progress()
        return {
            "state": self.state.value,
            "active": self.active.name if self.active else None,
            "pid": proc.pid if proc else None,
            "port": proc.port if proc else None,
            "uptime": (trio.current_time() - proc.ready_at) if proc and proc.ready_at else None,
            "inflight": len(self._leases),
            "waiting": self.waiting_by_profile(),
            "draining": self._draining_since is not None,
            "load_elapsed": elapsed,
            "load_expected": expected,
            "last_error": None if error is None else {
                "at": self.last_error_at,
                "kind": {"StartTimeout": "start_timeout", "ModelCrashed": "crashed",
                         "ModelHung": "hung"}.get(type(error).__name__, "start_failed"),
                "profile": error.profile,
                "message": str(error).splitlines()[0],
                "exit_code": error.exit_code,
                "stderr_tail": error.stderr_tail,
            },
            "load_seconds": dict(self.load_seconds),
            "circuits": self.circuits(),
            "history": list(self.history),
            "phase": self.phase,
            "cache": self.slots.status(),
            "state_write_errors": dict(self.state_writes.counts),
            **self.stats,
        }

    # ----------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        async with self._receive:
            while not (self._shutting_down and self._ready_to_exit()):
                with trio.move_on_at(self._next_deadline()):
                    self._handle(await self._receive.receive())
                self._on_timers()
                self._schedule()
                if not self._shutting_down:
                    self._launch_checks()  # for whoever still waits after this step
            # Answer what is still queued, so nobody waits on a loop that is gone; a
            # later send finds the channel closed and reads that as ShuttingDown too.
            while True:
                try:
                    message = self._receive.receive_nowait()
                except trio.WouldBlock:
                    return
                match message:
                    case Acquire(_, waiter):
                        self._answer(waiter, ShuttingDown())
                    case Reload(_, reply):
                        reply.send_nowait(ShuttingDown())
                    case Unload(done):
                        done.set()

    def _handle(self, message: Message) -> None:
        match message:
            case Acquire(name, waiter):
                self._on_acquire(name, waiter)
            case Release(lease):
                self._return_lease(lease)
            case Withdraw(waiter):
                self._on_withdraw(waiter)
            case Unload(done):
                self._unloads.append(done)
                self._unload_requested = True
            case Shutdown():
                self._shutting_down = True
                self._fail_all_waiters(ShuttingDown())
            case Reload(config, reply):
                reply.send_nowait(self._on_reload(config))
            case Checked(profile, problem):
                self._on_checked(profile, problem)
            case StartDone(profile, proc, error):
                self.phase = None
                self._on_start_done(profile, proc, error)
                if proc is not None and proc is self.proc and self.state is State.READY:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._probe_health, proc)
            case Phase(text):
                self.phase = text
                self._publish("phase", text=text)
            case Stopped(proc):
                self.phase = None
                if proc is self.proc:
                    if self._swap:  # a swap: the next load's record starts here
                        self._swap["stopped"] = trio.current_time()
                    self.proc = None
                    self.active = None
                    self._transition(State.IDLE)
                    self._publish("stopped", profile=proc.name, exit_code=proc.exit_code)
            case Exited(proc):
                self._on_exited(proc)
            case Hung(proc, why):
                self._on_hung(proc, why)

    def _on_acquire(self, name: str | None, waiter: Waiter) -> None:
        if self._shutting_down:
            self._answer(waiter, ShuttingDown())
            return
        if name is None:
            if self.active is None:
                self._answer(waiter, NoModelLoaded(list(self.config.profiles)))
                return
            if self.active.name not in self.config.profiles:  # removed, going away
                self._answer(waiter, UnknownModel(self.active.name,
                                                  self.config.model_names()))
                return
            profile = self.active
        else:
            resolved = self.config.resolve(name)
            if not isinstance(resolved, Profile):
                self._answer(waiter, UnknownModel(name, self.config.model_names()))
                return
            profile = resolved
        waiter.profile = profile.name
        if self._can_grant(profile):
            self._grant(waiter)
            return
        refusal = self._circuit_refusal(profile.name)
        if refusal is not None:
            self._answer(waiter, refusal)
            return
        if self.n_waiting >= self.config.queue.max_waiting:
            self._answer(waiter, QueueFull(self.config.queue.max_waiting,
                                           retry_after=self._retry_after()))
            return
        self._waiting.setdefault(profile.name, deque()).append(waiter)
        self._publish("queued", profile=profile.name, waiting=self.n_waiting)

    def _on_withdraw(self, waiter: Waiter) -> None:
        queue = self._waiting.get(waiter.profile)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            waiter.answered = True
            self._publish("left_queue", profile=waiter.profile, waiting=self.n_waiting)
        elif waiter.lease is not None:
            # Granted, but the requester was gone before it could take the lease.
            self._return_lease(waiter.lease)

    def _return_lease(self, lease: Lease) -> None:
        """A lease came back; the last one out starts the idle clock (TTL)."""
        if lease in self._leases:
            self._leases.discard(lease)
            if not self._leases:
                self._idle_since = trio.current_time()

    def _on_start_done(self, profile: Profile, proc: process.LlamaProcess | None,
                       error: StartError | None) -> None:
        self._start_scope = None
        if self.state is State.STOPPING:  # a cancelled start
            if proc is not None and proc.alive:  # it won the race: stop it like any other
                assert self._nursery is not None
                self.proc = proc
                self._nursery.start_soon(self._run_stop, proc, None)
                return
            self.proc = None
            self.active = None
            self._transition(State.IDLE)
            self._publish("stopped", profile=profile.name, exit_code=None)
            return
        if error is None and proc is not None and not proc.alive:
            # It died after its readiness (during a cache restore, say), and its Exited
            # came while STARTING: no usable child, so a failed start, not READY.
            error = StartFailed(profile.name, f"{process.describe_exit(proc.exit_code)} "
                                "right after it became ready", exit_code=proc.exit_code,
                                stderr_tail=list(proc.tail)[-15:])
            proc.kill_now()  # whatever it left behind in its group
        if error is not None or proc is None:
            assert error is not None
            self.proc = None
            self._transition(State.FAILED)
            self._start_failed(profile, error)
            self._record_load(profile.name, "failed")
            self.active = None
            return
        assert proc.ready_at is not None
        seconds = proc.ready_at - proc.started_at
        self.load_seconds[profile.name] = seconds
        _write_load_times(self.config, self.load_seconds, self.state_writes)
        self.proc = proc
        self._transition(State.READY)
        self._idle_since = trio.current_time()
        self._record_load(profile.name, "ok")
        health = self.health.get(profile.name)
        if health is not None and health.opened_at is not None:
            health.opened_at = None  # the trial worked; its failures stay until stable
            self._publish("circuit_closed", profile=profile.name)
        self._publish("ready", profile=profile.name, pid=proc.pid, load_seconds=seconds)

    def _start_failed(self, profile: Profile, error: StartError) -> None:
        """A start failed, or its preflight refused it: count it, tell its waiters."""
        self.last_error, self.last_error_at = error, self._wall()
        self.stats["starts_failed"] += 1
        log.error("%s", error)
        self._publish("start_failed", profile=profile.name, exit_code=error.exit_code,
                      message=str(error).splitlines()[0])
        self._record_failure(profile.name, str(error).splitlines()[0])
        # Everyone waiting for this profile hears why; others keep waiting.
        failure = LocalFailed(error)
        for waiter in self._waiting.pop(profile.name, deque()):
            self._answer(waiter, failure)

    def _on_checked(self, profile: Profile, problem: str | None) -> None:
        self._checking.discard(profile.name)
        if self._shutting_down or self.config.profiles.get(profile.name) != profile:
            return  # a reload changed it meanwhile: the new definition gets its own check
        if problem is None:
            self._cleared[profile.name] = profile
            return
        # Refused before anything was drained or stopped for it: the running model
        # never noticed; the state machine has nothing to do.
        self._start_failed(profile, StartFailed(profile.name, problem))

    def _launch_checks(self) -> None:
        """While a model is ready, check each other profile with waiters before it may
        be drained for them (with nothing running, the start itself checks first)."""
        assert self._nursery is not None
        for name in [n for n in self._cleared if not self._waiting.get(n)]:
            del self._cleared[name]  # nobody waits: by the next request it may be stale
        if self.state is not State.READY or self.active is None:
            return
        for name, queue in self._waiting.items():
            profile = self.config.profiles.get(name)
            if (not queue or profile is None or name in self._checking
                    or name == self.active.name or self._cleared.get(name) == profile):
                continue
            self._checking.add(name)
            self._nursery.start_soon(self._run_check, profile)

    def _cleared_for_start(self, name: str) -> bool:
        profile = self._cleared.get(name)
        return profile is not None and profile == self.config.profiles.get(name)

    def _on_reload(self, new: Config) -> dict[str, Any]:
        old = self.config
        same_server = old.llama_server == new.llama_server
        added = [n for n in new.profiles if n not in old.profiles]
        removed = [n for n in old.profiles if n not in new.profiles]
        changed = [n for n in new.profiles if n in old.profiles
                   and (old.profiles[n] != new.profiles[n] or not same_server)]
        self.config = new
        self.slots.config = new
        for name in removed + changed:
            self.health.pop(name, None)  # a fixed profile deserves a fresh start
            self.load_seconds.pop(name, None)
        for name in removed:
            for waiter in self._waiting.pop(name, deque()):
                self._answer(waiter, UnknownModel(name, new.model_names()))
        active = self.active.name if self.active else None
        if active is not None and active not in changed and active not in removed:
            self.active = new.profiles[active]  # same definition: keeps serving as is
        elif active in removed and self.state is State.READY:
            self._unload_requested = True  # unloaded once its requests are done
        elif active is not None and self.state is State.STARTING:
            # Removed or changed while it loads: nobody may use what it would become.
            # Stop it (once ready, if it wins the race); waiters of a changed profile
            # stay queued and get a start of its new definition.
            log.info("stopping the start of %s: the reload %s it", active,
                     "removed" if active in removed else "changed")
            self._cancel_start()
        summary = {"added": added, "removed": removed, "changed": changed,
                   "active": active, "active_kept": active is not None
                   and active not in changed and active not in removed}
        log.info("config reloaded: %s", summary)
        self._publish("reloaded", **summary)
        return summary

    def _record_load(self, profile: str, result: str) -> None:
        now = trio.current_time()
        began = self._swap.get("began", now)
        stopped = self._swap.get("stopped", began)
        self.history.append({
            "at": self._wall(), "from": self._swap.get("from"), "to": profile,
            "result": result, "stop_seconds": round(stopped - began, 4),
            "load_seconds": round(now - stopped, 4), "total_seconds": round(now - began, 4)})
        self._swap = {}

    def _on_exited(self, proc: process.LlamaProcess) -> None:
        if proc is not self.proc or self.state is not State.READY:
            return  # a stop or a failed start we already account for
        self._forget_if_stable()  # a crash after a long run starts a new count
        error = ModelCrashed(proc.name, proc.exit_code, list(proc.tail)[-15:],
                             process.describe_exit(proc.exit_code))
        log.error("%s; last output:\n%s", error, "\n".join(error.stderr_tail))
        self.last_error, self.last_error_at = error, self._wall()
        self.stats["crashes"] += 1
        proc.kill_now()  # whatever it left behind in its group
        for lease in self._leases:
            lease.revoked_because = str(error)
            lease.scope.cancel()
        self._leases.clear()
        self.proc = None
        self.active = None
        self._draining_since = None
        self._transition(State.FAILED)
        self._publish("crashed", profile=proc.name, exit_code=proc.exit_code)
        self._record_failure(proc.name, str(error))

    def _on_hung(self, proc: process.LlamaProcess, why: str) -> None:
        """A ready child stopped answering: kill it and treat it like a crash."""
        if proc is not self.proc or self.state is not State.READY:
            return  # it already exited or is being stopped
        error = ModelHung(proc.name, why, list(proc.tail)[-15:])
        log.error("%s", error)
        self.last_error, self.last_error_at = error, self._wall()
        self.stats["hangs"] += 1
        # SIGKILL, not SIGTERM: a stopped process would not act on SIGTERM until
        # continued, a deadlocked one maybe never. _watch reaps it.
        proc.kill_now()
        for lease in self._leases:
            lease.revoked_because = str(error)
            lease.scope.cancel()
        self._leases.clear()
        self.proc = None
        self.active = None
        self._draining_since = None
        self._transition(State.FAILED)
        self._publish("hung", profile=proc.name, pid=proc.pid, message=str(error))
        self._record_failure(proc.name, str(error))

    # ------------------------------------------------------------- scheduling

    def serving(self, name: str | None) -> bool:
        """Would a request for ``name`` be granted without waiting? A read-only peek."""
        if self.active is None:
            return False
        profile = self.active if name is None else self.config.resolve(name)
        return isinstance(profile, Profile) and self._can_grant(profile)

    def _can_grant(self, profile: Profile) -> bool:
        return (self.state is State.READY and self.active is not None
                and profile.name == self.active.name and self._draining_since is None
                and not self._unload_requested)

    def _schedule(self) -> None:
        """Decide the next step from the current state; called after every message."""
        if self.state is State.READY:
            assert self.active is not None
            if self._draining_since is None:
                for waiter in self._waiting.pop(self.active.name, deque()):
                    self._grant(waiter)
                if self._unload_requested or self._shutting_down or self._others_starved():
                    self._draining_since = trio.current_time()
                    self._publish("draining", profile=self.active.name,
                                  inflight=len(self._leases))
            wants_other = self._unload_requested or self._shutting_down or any(
                q for name, q in self._waiting.items()
                if name != self.active.name and self._cleared_for_start(name))
            if self._draining_since is not None and not wants_other:
                # Whoever it drained for is gone (timed out, left, removed): serve on
                # rather than cut its in-flight requests at the deadline for nobody.
                self._draining_since = None
                self._publish("drain_cancelled", profile=self.active.name)
                for waiter in self._waiting.pop(self.active.name, deque()):
                    self._grant(waiter)
            if self._draining_since is not None and not self._leases:
                self._begin_stop()
            elif wants_other and not self._leases and self._draining_since is None:
                self._draining_since = trio.current_time()
                self._begin_stop()
        elif self.state in (State.IDLE, State.FAILED):
            if self._unload_requested:
                if self.state is State.FAILED:
                    # Unload is about the process: none runs, so the state is IDLE.
                    # The profile's failure record (backoff, circuit) and last_error
                    # stay: they are facts about the profile, which unload does not fix.
                    self._transition(State.IDLE)
                self._finish_unloads()
            if self._shutting_down:
                return
            for name in [n for n, q in self._waiting.items() if q]:
                refusal = self._circuit_refusal(name)
                if refusal is not None:  # opened while they waited
                    for waiter in self._waiting.pop(name):
                        self._answer(waiter, refusal)
            oldest = self._oldest_waiter()
            if oldest is not None and trio.current_time() >= self._retry_at(oldest.profile):
                self._begin_start(self.config.profiles[oldest.profile])
        elif self.state is State.STARTING and (self._shutting_down or self._unload_requested):
            self._cancel_start()

    def _others_starved(self) -> bool:
        assert self.active is not None
        bound = self.config.queue.starvation_bound
        now = trio.current_time()
        return any(q and now - q[0].enqueued >= bound
                   for name, q in self._waiting.items()
                   if name != self.active.name and self._cleared_for_start(name))

    def _oldest_waiter(self) -> Waiter | None:
        heads = [q[0] for q in self._waiting.values() if q]
        return min(heads, key=lambda w: w.enqueued) if heads else None

    def _next_deadline(self) -> float:
        """When the loop must wake without a message: starvation, drain, TTL, backoff,
        and the end of a ready model's probation (``restart.stable_after``)."""
        deadlines = [self._stable_at()]
        if self.state in (State.IDLE, State.FAILED):
            oldest = self._oldest_waiter()
            if oldest is not None:
                deadlines.append(self._retry_at(oldest.profile))
        if self.state is State.READY and self.active is not None:
            if self._draining_since is None:
                bound = self.config.queue.starvation_bound
                deadlines += [q[0].enqueued + bound for name, q in self._waiting.items()
                              if q and name != self.active.name
                              and self._cleared_for_start(name)]
                ttl = self._ttl(self.active)
                if ttl and not self._leases and not self.n_waiting:
                    deadlines.append(self._idle_since + ttl)
            elif self._leases:
                deadlines.append(self._draining_since + self.config.timeouts.drain)
        return min(deadlines)

    def _on_timers(self) -> None:
        now = trio.current_time()
        if self.state is not State.READY or self.active is None:
            return
        self._forget_if_stable()
        if self._draining_since is not None:
            if self._leases and now >= self._draining_since + self.config.timeouts.drain:
                why = (f"{self._drain_cause()} and the request did not finish within "
                       f"timeouts.drain ({self.config.timeouts.drain:g}s)")
                log.warning("cutting %d request(s): %s", len(self._leases), why)
                for lease in self._leases:
                    lease.revoked_because = why
                    lease.scope.cancel()
                self._leases.clear()
            return
        ttl = self._ttl(self.active)
        if ttl and not self._leases and not self.n_waiting and now >= self._idle_since + ttl:
            log.info("unloading %s after %gs idle (ttl)", self.active.name, ttl)
            self._publish("ttl_expired", profile=self.active.name)
            self._draining_since = now
            self._begin_stop()

    def _drain_cause(self) -> str:
        """Why the active model is draining, in the words its cut requests will read.

        A TTL unload never cuts anyone: it begins only when no request is in flight.
        """
        assert self.active is not None
        name = self.active.name
        if self._shutting_down:
            return "swapd is shutting down"
        if name not in self.config.profiles:  # a reload took it out: _on_reload
            return f"model {name!r} was removed from the config by a reload"
        if self._unload_requested:
            return f"model {name!r} is being unloaded (swapd unload / POST /swapd/unload)"
        others = [q[0] for n, q in self._waiting.items() if q and n != name]
        if others:
            after = min(others, key=lambda w: w.enqueued).profile
            return f"model {name!r} is being swapped out for {after!r}"
        return f"model {name!r} is being stopped"

    def _record_failure(self, name: str, why: str) -> None:
        """Count a failed start or crash: back off, and open the circuit at the limit."""
        if name not in self.config.profiles:
            return  # removed by a reload: no circuit (or metric) for a gone profile
        restart = self.config.restart
        health = self.health.setdefault(name, ProfileHealth())
        health.failures += 1
        health.last_error = why
        now = trio.current_time()
        delay = min(restart.backoff * 2 ** (health.failures - 1), restart.backoff_max)
        health.retry_at = now + delay
        if health.failures >= restart.max_failures:
            health.opened_at = now
            log.error("circuit open for %s after %d consecutive failures; next try in %gs",
                      name, health.failures, restart.cooldown)
            self._publish("circuit_open", profile=name, failures=health.failures,
                          cooldown=restart.cooldown)

    def _stable_at(self) -> float:
        """When the ready model's failures are forgotten (inf: none to forget)."""
        if (self.state is not State.READY or self.active is None or self.proc is None
                or self.proc.ready_at is None or self.active.name not in self.health):
            return math.inf
        return self.proc.ready_at + self.config.restart.stable_after

    def _forget_if_stable(self) -> None:
        """The ready model has stayed up ``restart.stable_after``: its failures are over."""
        if self.active is not None and trio.current_time() >= self._stable_at():
            del self.health[self.active.name]
            log.info("%s has been up %gs; its earlier failures are forgotten",
                     self.active.name, self.config.restart.stable_after)

    def _retry_at(self, name: str) -> float:
        health = self.health.get(name)
        return -math.inf if health is None or health.opened_at is not None else health.retry_at

    def _circuit_refusal(self, name: str) -> CircuitOpen | None:
        """The error for a request that must not start ``name`` now, or None."""
        health = self.health.get(name)
        if health is None or health.opened_at is None:
            return None
        cooldown = self.config.restart.cooldown
        now = trio.current_time()
        if health.circuit(now, cooldown) == "half_open":
            return None  # one trial start; requests wait for its outcome
        return CircuitOpen(name, health.failures, health.opened_at + cooldown - now,
                           health.last_error)

    def circuits(self) -> dict[str, dict[str, Any]]:
        now = trio.current_time()
        cooldown = self.config.restart.cooldown
        return {name: {"state": h.circuit(now, cooldown), "failures": h.failures,
                       "last_error": h.last_error}
                for name, h in self.health.items()}

    def _ttl(self, profile: Profile) -> float:
        return profile.ttl if profile.ttl is not None else self.config.ttl

    def _retry_after(self) -> float:
        expected = self.load_seconds.get(self.active.name) if self.active else None
        return max(1.0, round(expected or 5.0))

    # ------------------------------------------------------------- transitions

    def _transition(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.state.name} -> {new.name}")
        log.debug("state %s -> %s", self.state.name, new.name)
        self.state = new
        self._publish("state", state=new.value,
                      profile=self.active.name if self.active else None)

    def _grant(self, waiter: Waiter) -> None:
        assert self.proc is not None and self.active is not None
        lease = Lease(self.active, self.proc)
        self._leases.add(lease)
        waiter.lease = lease
        self._answer(waiter, lease)

    def _answer(self, waiter: Waiter, result: Lease | LeaseError) -> None:
        if waiter.answered:
            return
        waiter.answered = True
        try:
            waiter.reply.send_nowait(result)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            if isinstance(result, Lease):
                self._leases.discard(result)

    def _fail_all_waiters(self, error: LeaseError) -> None:
        for queue in self._waiting.values():
            for waiter in queue:
                self._answer(waiter, error)
        self._waiting.clear()

    def _begin_start(self, profile: Profile) -> None:
        assert self._nursery is not None
        if "stopped" not in self._swap:  # a load with nothing to stop first
            now = trio.current_time()
            self._swap = {"from": None, "began": now, "stopped": now}
        self.active = profile
        self._cleared.pop(profile.name, None)  # each start is checked afresh
        self._draining_since = None
        self._start_began = trio.current_time()
        self._transition(State.STARTING)
        self._publish("starting", profile=profile.name,
                      expected_seconds=self.load_seconds.get(profile.name))
        scope = trio.CancelScope()
        self._start_scope = scope
        self._nursery.start_soon(self._run_start, profile, scope)

    def _begin_stop(self) -> None:
        assert self._nursery is not None and self.proc is not None
        # A swap when someone waits for another model; an unload, TTL or shutdown
        # otherwise, and then the next load starts from nothing.
        if any(self._waiting.values()) and not self._shutting_down:
            self.stats["swaps"] += 1
            self._swap = {"from": self.proc.name, "began": trio.current_time()}
        else:
            self._swap = {}
        self._transition(State.STOPPING)
        self._draining_since = None
        self._publish("stopping", profile=self.proc.name)
        self._nursery.start_soon(self._run_stop, self.proc, self.active)

    def _cancel_start(self) -> None:
        if self._start_scope is not None:
            self._start_scope.cancel()
        self._transition(State.STOPPING)

    def _finish_unloads(self) -> None:
        self._unload_requested = False
        for done in self._unloads:
            done.set()
        self._unloads.clear()

    def _ready_to_exit(self) -> bool:
        return self.state in (State.IDLE, State.FAILED) and self._start_scope is None

    def _publish(self, kind: str, **data: Any) -> None:
        self._seq += 1
        self.events.append(Event(self._seq, self._wall(), kind, data))
        self._changed.set()
        self._changed = trio.Event()

    # ----------------------------------------------------------- helper tasks

    async def _run_start(self, profile: Profile, scope: trio.CancelScope) -> None:
        timeouts = self.config.timeouts
        proc: process.LlamaProcess | None = None
        error: StartError | None = None
        handed_over = False
        try:
            with scope:
                try:
                    problem = await self._check(profile)
                    if problem is not None:  # cheap if it ran before the drain: cached
                        raise StartFailed(profile.name, problem)
                    await self._check_fits(profile)
                    proc = self._launch(self.config, profile, self.child_log,
                                        self.slots.argv(profile))
                    assert self._nursery is not None
                    self._nursery.start_soon(self._watch, proc)
                    await proc.wait_ready(timeouts.start, timeouts.health_interval)
                    slots, size = self.slots.restorable(profile)
                    if slots:
                        await self._post_shielded(Phase(
                            f"restoring {profile.name}'s prompt cache, {size / 1e6:.1f} MB"))
                        with trio.move_on_after(SLOT_TIMEOUT):
                            await self.slots.restore(proc, profile)
                except StartError as failure:
                    error = failure
            if (error is not None or scope.cancelled_caught) and proc is not None:
                await proc.stop(timeouts.stop)
            await self._post_shielded(StartDone(profile, proc, error))
            handed_over = True
        finally:
            # Cancelled from outside (the supervisor itself is going away): the child
            # is nobody else's yet, so it must not outlive this task.
            if not handed_over and proc is not None and proc.alive:
                with trio.CancelScope(shield=True):  # bounded by stop()'s own grace
                    await proc.stop(timeouts.stop)

    async def _run_check(self, profile: Profile) -> None:
        await self._post_shielded(Checked(profile, await self._check(profile)))

    async def _check(self, profile: Profile) -> str | None:
        """The preflight's verdict on ``profile`` (see ``preflight.py``)."""
        try:
            return await self._preflight(self.config, profile)
        except Exception:  # a bug in a check must not take swapd down: start unchecked
            log.exception("the preflight of %s failed; starting it unchecked", profile.name)
            return None

    async def _check_fits(self, profile: Profile) -> None:
        """memory.guard: refuse a start whose estimate exceeds the GPU, with a fix."""
        gpu = self.config.memory.gpu or self._detected_gpu
        if not self.config.memory.guard or gpu is None:
            return
        estimate = await trio.to_thread.run_sync(estimate_profile, profile)
        if estimate.fits(gpu) is not False:
            return  # fits, or cannot be sized: never block on a guess
        fix = suggest_fix(estimate, gpu)
        raise StartFailed(profile.name, f"its estimated {format_bytes(estimate.total)} does "
                          f"not fit in {format_bytes(gpu)} of GPU memory (memory.guard)"
                          + (f"; to fit: {fix.text}" if fix else ""))

    async def _run_stop(self, proc: process.LlamaProcess, profile: Profile | None) -> None:
        started = trio.current_time()
        if profile is not None and proc.alive and self.slots.keeps(profile):
            await self._post_shielded(Phase(f"saving {profile.name}'s prompt cache"))
            with trio.move_on_after(SLOT_TIMEOUT):
                await self.slots.save(proc, profile)
        await proc.stop(self.config.timeouts.stop)
        log.info("stopped %s in %.0f ms (exit code %s)", proc.name,
                 1000 * (trio.current_time() - started), proc.exit_code)
        await self._post_shielded(Stopped(proc))

    async def _watch(self, proc: process.LlamaProcess) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proc.watch)
            await proc.exited.wait()
            await self._post_shielded(Exited(proc))

    async def _probe_health(self, proc: process.LlamaProcess) -> None:
        """Watch the ready ``proc`` for life until it stops being the ready child.

        A child that sent no byte of any answer for ``timeouts.health_check`` is asked
        ``/health`` (each probe bounded by ``timeouts.health_check_timeout``; any answer
        will do); after a miss the next probe follows at once. Bytes of an answer count
        as life too: a child streaming tokens is alive even while its HTTP threads are
        too busy to answer a probe. ``HEALTH_MISSES`` misses in a row report it ``Hung``.
        """
        misses = 0
        while self.proc is proc and self.state is State.READY and proc.alive:
            timeouts = self.config.timeouts  # the current one, across reloads
            if not timeouts.health_check:
                return
            if misses == 0:
                due = proc.last_heard + timeouts.health_check
                if trio.current_time() < due:
                    await trio.sleep_until(due)
                    continue  # look again: it may have answered someone, or gone
            asked = trio.current_time()
            if (await proc.answers_health(timeouts.health_check_timeout)
                    or proc.last_heard > asked):
                misses = 0
                continue
            if self.proc is not proc or not proc.alive:
                return
            misses += 1
            log.warning("%s (pid %d) did not answer its health check within %gs (%d of %d)",
                        proc.name, proc.pid, timeouts.health_check_timeout, misses,
                        HEALTH_MISSES)
            if misses >= HEALTH_MISSES:
                await self._post_shielded(Hung(proc, (
                    f"{misses} probes in a row got no answer within "
                    f"{timeouts.health_check_timeout:g}s (timeouts.health_check_timeout)")))
                return

    async def _post_shielded(self, message: Message) -> None:
        """Send from cleanup paths: shielded so it happens, bounded so it cannot hang."""
        try:
            self._send.send_nowait(message)  # the usual case: room in the channel
            return
        except trio.WouldBlock:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        with (trio.CancelScope(shield=True), trio.move_on_after(5),
              contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError)):
            await self._send.send(message)

    async def _stop_now(self) -> None:
        """Last resort when ``run`` ends: the child never outlives the supervisor."""
        for lease in self._leases:
            lease.revoked_because = "swapd stopped at once, without waiting for requests"
            lease.scope.cancel()
        if self.proc is not None and self.proc.alive:
            await self.proc.stop(self.config.timeouts.stop)


def _load_times_path(config: Config) -> Path:
    return config.state_dir / "load_times.json"


def _read_load_times(config: Config) -> dict[str, float]:
    """Last load duration per profile, so progress shows an ETA from the second load on."""
    try:
        data = json.loads(_load_times_path(config).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float)}


def _write_load_times(config: Config, times: dict[str, float], errors: WriteErrors) -> None:
    path = _load_times_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(times, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as error:
        errors.failed("load_times", path, error)
    else:
        errors.succeeded("load_times")
