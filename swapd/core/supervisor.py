"""The supervisor: the one owner of the llama-server processes and of what they serve.

A single trio task (``Supervisor.run``) owns one state machine per child (:class:`Child`:
starting, ready, draining, stopping), the in-flight leases, the waiting queue and the
residency planner's calls. Everything else talks to it through one bounded memory
channel: requests send ``Acquire``/``Release``/``Withdraw``, operators ``Unload``/
``Shutdown``/``Kill``, and the supervisor's own helper tasks report ``Checked``,
``Sized``, ``StartDone``, ``Stopped``, ``Exited`` and ``Hung``. Preflights, sizing,
starts and stops run in helper tasks so the loop keeps answering (and queueing) while a
model loads.

A ready child is also watched for life (``_probe_health``): one that sent nothing for
``timeouts.health_check`` is asked ``/health``, and ``HEALTH_MISSES`` unanswered probes
in a row make it ``Hung``: it is killed and handled like a crash (its leases revoked,
backoff, circuit), because a stopped or deadlocked llama-server never exits by itself.
A crash or hang of one child touches only that child's requests.

Scheduling, in one function (``_schedule``), per profile with waiters, oldest first:

* a request for a ready, non-draining child is granted at once (all its waiters together:
  ABCABC costs three loads, not six);
* a request for a starting child waits for it;
* otherwise the pure planner (``planner.plan``) decides from the residents' footprints,
  the GPUs' budgets and ``residency.max_models``: **load** now (several starts run at once
  when they fit), **load after stopping** idle models (least recently used first), **wait**
  for busy ones (past ``queue.starvation_bound`` the fewest needed are drained: in-flight
  requests finish, bounded by ``timeouts.drain``), or **never** (503 ``model_too_large``,
  fallbacks may serve it);
* nothing is drained or stopped for a profile before its preflight (a helper task: model
  file, flag names; see ``preflight.py``) passed: one that fails is answered at once (503,
  its circuit counts it) and the resident models never notice.

With the defaults (``residency.mode: count``, ``max_models: 1``) this is exactly the
one-model-at-a-time swapping of earlier versions. The supervisor publishes typed facts
(:class:`Loaded`, :class:`Swapped`, :class:`Evicted`, :class:`LoadFailed`,
:class:`Crashed`) on its events; metrics and status read those instead of re-deriving.
"""

from __future__ import annotations

import contextlib
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

from swapd.config import Config, Profile
from swapd.config.flags import canonical_flag
from swapd.core import planner, process
from swapd.core.child import (
    EVICTION_REASONS,
    Child,
    IllegalTransition,
    Lease,
    ProfileHealth,
    State,
    Waiter,
    allowed,
)
from swapd.core.footprint import Footprint, FootprintStore, definition_key
from swapd.core.messages import (
    Acquire,
    Checked,
    Crashed,
    Event,
    Evicted,
    Exited,
    Fact,
    Hung,
    KeepAlive,
    Kill,
    Launcher,
    Load,
    Loaded,
    LoadFailed,
    Measured,
    Message,
    Phase,
    Release,
    Reload,
    Shutdown,
    Sized,
    StartDone,
    Stopped,
    Swapped,
    Unload,
    Withdraw,
)
from swapd.core.preflight import Preflight, PreflightCheck
from swapd.core.slotcache import SLOT_TIMEOUT, SlotCache
from swapd.core.statedir import WriteErrors
from swapd.errors import (
    CircuitOpen,
    ConfigError,
    LeaseError,
    LocalFailed,
    ModelCrashed,
    ModelHung,
    NoModelLoaded,
    NotReadyNow,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    StartError,
    StartFailed,
    UnknownModel,
    WontFit,
)
from swapd.estimate import detect_gpu_memory, estimate_profile, format_bytes, suggest_fix

log = logging.getLogger(__name__)

HEALTH_MISSES = 3
"""Liveness probes in a row a ready child may leave unanswered before it counts as hung."""


POST_TIMEOUT = 5.0
"""Seconds a helper task's report may wait for room in the supervisor's channel."""

REPLY_TIMEOUT = 10.0
"""Seconds a command may wait for the loop's room and answer (the loop answers at once;
only a loop that is gone leaves it waiting): then it reads as shutting down."""

UNLOAD_MARGIN = 10.0
"""Seconds an unload may take beyond its drain, cache save and stop grace (the stop's
own SIGKILL and reap) before ``unload`` reports that it did not finish."""


MEASURE_SETTLE = 0.2
"""Seconds after readiness (and between looks) before a child's buffer lines are read."""

MEASURE_WAIT = 2.0
"""Seconds after readiness within which a child's buffer lines are looked for."""

SIZE_TIMEOUT = 30.0
"""Seconds sizing a profile (stat its model, read the GGUF header) may take off-loop before
it is planned as needing its whole GPU."""


class Supervisor:
    """Owns the children and their state machines. See the module docstring."""

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
        self._children: dict[str, Child] = {}
        self._failed: dict[str, float] = {}  # profiles in FAILED (no child): since when
        self._recent: str | None = None  # the profile most recently started or used
        self.last_error: StartError | ModelCrashed | None = None
        self.last_error_at: float | None = None  # wall clock
        self.events: deque[Event] = deque(maxlen=256)
        self.load_seconds: dict[str, float] = _read_load_times(config)
        self.contexts: dict[str, int] = {}
        """Per profile, the context one request got at its last load, as the child said:
        what discovery reports once known (this definition, this binary)."""
        self.stats = {"swaps": 0, "starts_failed": 0, "crashes": 0, "hangs": 0}
        self.evictions: dict[str, int] = dict.fromkeys(EVICTION_REASONS, 0)
        self.health: dict[str, ProfileHealth] = {}
        self.slots = SlotCache(config.state_dir / "slots", config, self.state_writes)
        self.footprints = FootprintStore(config.state_dir / "footprints.json")
        self.sizes: dict[str, Sized] = {}  # the footprint planned for each profile
        self.phase: str | None = None
        """What the running start or stop is doing, when it is more than starting."""
        self.history: deque[dict[str, Any]] = deque(maxlen=50)
        """The last loads: from, to, stop/load/total seconds, result (status, the UI)."""
        self._room: dict[str, dict[str, Any]] = {}  # target -> its swap record so far
        self._wall = clock
        self._seq = 0
        self._changed = trio.Event()
        self._send, self._receive = trio.open_memory_channel[Message](
            max(64, 4 * config.queue.max_waiting))
        self._waiting: dict[str, deque[Waiter]] = {}
        self._checking: set[str] = set()  # profiles whose preflight runs now
        self._sizing: set[str] = set()  # profiles being sized now
        self._cleared: dict[str, Profile] = {}  # passed it; the next start consumes it
        self._unloads: list[tuple[frozenset[str], trio.Event]] = []
        self._timer: trio.CancelScope | None = None
        """The loop's wait for its next message, until its next deadline (a TTL, ...)."""
        self._unloading: set[str] = set()  # children an unload stops
        self._oom_retry: set[str] = set()  # profiles whose next start is an OOM retry
        self._uses = 0  # Child.use_seq's counter
        self._kill_requested = False  # kill_now: the last cleanup kills, no grace
        self._shutting_down = False
        self._nursery: trio.Nursery | None = None
        self._detected_gpu: int | None = None

    # ------------------------------------------------------- read-only views

    @property
    def state(self) -> State:
        """The state of the most recently used child (IDLE when none runs; FAILED when
        the last start or child failed and nothing else runs)."""
        child = self._current()
        if child is not None:
            return child.state
        if self._recent is not None and self._recent in self._failed:
            return State.FAILED
        return State.IDLE

    @property
    def active(self) -> Profile | None:
        """The profile of the most recently used child, or None."""
        child = self._current()
        return child.profile if child is not None else None

    @property
    def proc(self) -> process.LlamaProcess | None:
        """The process of the most recently used child (None while it starts)."""
        child = self._current()
        return child.proc if child is not None else None

    def _current(self) -> Child | None:
        if self._recent is not None and self._recent in self._children:
            return self._children[self._recent]
        if not self._children:
            return None
        return max(self._children.values(), key=lambda c: c.use_seq)

    def children(self) -> list[Child]:
        """Every child, most recently used first (read-only: do not change them)."""
        return sorted(self._children.values(), key=lambda c: -c.use_seq)

    def profile_state(self, name: str) -> State:
        """One profile's state: its child's, else FAILED or IDLE."""
        child = self._children.get(name)
        if child is not None:
            return child.state
        return State.FAILED if name in self._failed else State.IDLE

    # ------------------------------------------------------------------ public API

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``shutdown()``; the children are stopped before this returns."""
        # Under open_server's lock on state_dir: what an earlier swapd left there is stale.
        await process.reap_leftovers(self.config.state_dir, self.config.timeouts.stop)
        budget_mode = self.config.residency.mode == "budget" and not self.config.gpus
        if ((self.config.memory.guard or budget_mode) and self.config.memory.gpu is None):
            self._detected_gpu = await trio.to_thread.run_sync(detect_gpu_memory)
            if self._detected_gpu is None and budget_mode:
                raise ConfigError([
                    "residency.mode is budget but the GPU memory is unknown (no gpus, no "
                    "memory.gpu, and nvidia-smi did not say): set gpus: [{id: 0, memory: "
                    "24GiB}] or memory.gpu @ residency.mode"])
            if self._detected_gpu is None:
                log.warning("memory.guard is on but the GPU memory is unknown (no nvidia-smi);"
                            " set memory.gpu")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._want_resident()
            task_status.started()
            try:
                await self._loop()
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop_now()
                nursery.cancel_scope.cancel()
                self._publish("shutdown")  # the last event: followers can stop here

    def _want_resident(self) -> None:
        """Pinned and preload profiles: load them at start, as if a request waited."""
        for profile in self.config.profiles.values():
            if profile.pinned or profile.preload:
                self._want(profile)

    def _want(self, profile: Profile) -> None:
        """An internal want: a waiter whose reply nobody reads (the load is the point)."""
        reply, _ = trio.open_memory_channel[Lease | LeaseError](1)
        waiter = Waiter(profile.name, trio.current_time(), reply, internal=True)
        self._waiting.setdefault(profile.name, deque()).append(waiter)

    def _want_again(self, profile: Profile) -> None:
        """A pinned model that crashed or hung comes back (after its backoff; an open
        circuit answers the want and ends the retries)."""
        if (profile.pinned and not self._shutting_down
                and self.config.profiles.get(profile.name) == profile):
            self._want(profile)

    @asynccontextmanager
    async def lease(self, name: str | None, *,
                    queue_wait: float | None = None) -> AsyncIterator[Lease]:
        """Hold the named profile's child for one request (loading it if needed)."""
        lease = await self.acquire(name, queue_wait=queue_wait)
        try:
            yield lease
        finally:
            await self.release(lease)

    @asynccontextmanager
    async def try_lease(self, name: str | None) -> AsyncIterator[Lease | None]:
        """A lease on ``name`` only if its child is ready now: never queues or loads.

        For readers that may talk to a child only if it runs anyway (``/props``).
        """
        try:
            lease = await self.acquire(name, ready_only=True)
        except LeaseError:
            yield None
            return
        try:
            yield lease
        finally:
            await self.release(lease)

    def lease_now(self, name: str | None) -> Lease | None:
        """A lease on ``name`` if the loop would grant one at once, else None (then
        ``acquire``): the ready model's requests skip a round trip through the loop.

        The same grant as the loop's, made in the caller's task: nothing here awaits, so
        no other task sees the state half changed (trio runs one task at a time).
        """
        profile = self._target(name)
        child = self._children.get(profile.name) if isinstance(profile, Profile) else None
        if child is None or not self._can_grant(child):
            return None
        return self._new_lease(child)

    async def acquire(self, name: str | None, *, queue_wait: float | None = None,
                      ready_only: bool = False) -> Lease:
        """Wait for a lease on ``name`` (a profile name or alias; None = the active one).

        Raises a ``LeaseError``: ``QueueFull``, ``QueueTimeout`` after ``queue_wait``
        (default ``timeouts.queue_wait``), ``Unavailable`` when the start failed.
        A caller cancelled while waiting leaves the queue; the load it caused goes on.
        """
        wait = self.config.timeouts.queue_wait if queue_wait is None else queue_wait
        reply_send, reply_receive = trio.open_memory_channel[Lease | LeaseError](1)
        waiter = Waiter(name or "", trio.current_time(), reply_send, ready_only=ready_only)
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
        if not self._release_now(lease):
            await self._post_shielded(Release(lease))

    def _release_now(self, lease: Lease) -> bool:
        """Take a lease back in the caller's task if the loop has nothing to do about it
        (a ready model nobody else waits for, nothing to stop or unload): True if done.

        Like ``lease_now``, it changes state without awaiting. A last lease back starts
        the model's idle clock: the loop's timer is moved to its TTL, not the loop woken.
        """
        child = self._children.get(lease.profile.name)
        if (child is None or lease not in child.leases or not self._can_grant(child)
                or child.keep_alive == 0  # to unload at once: the loop's work
                or self._shutting_down or self._unloads or self._unloading
                or any(self._waiting.values())):
            return False
        self._return_lease(lease)
        if not child.leases and self._timer is not None:
            self._timer.deadline = min(self._timer.deadline, self._next_deadline())
        return True

    async def load(self, name: str) -> LeaseError | None:
        """Have ``name`` loaded without waiting for it or holding it (llama.cpp's
        ``POST /models/load``): the load is published like any other (``starting``,
        ``ready`` or ``start_failed``), and the model idles like a preloaded one.

        Returns why the loop refuses it at once (no such profile, its circuit is open,
        swapd is shutting down), else None.
        """
        reply_send, reply_receive = trio.open_memory_channel[LeaseError | None](1)
        with trio.move_on_after(REPLY_TIMEOUT):
            try:
                await self._send.send(Load(name, reply_send))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return ShuttingDown()
            return await reply_receive.receive()  # answered by the loop or its exit
        return ShuttingDown()

    async def unload(self, name: str | None = None, *, wait: bool = True) -> bool:
        """Stop a model (``name``) or every resident one but the pinned (None) once
        their in-flight requests are done.

        Bounded by the drain, the stop grace and a cache save; False if that passed.
        With ``wait=False`` it returns once the command is sent, before the loop acts
        on it (llama.cpp's ``POST /models/unload``; the stop is published as it happens).
        Raises ``UnknownModel`` for a name no profile has.
        """
        if name is not None:
            resolved = self.config.resolve(name)
            if not isinstance(resolved, Profile):
                raise UnknownModel(name, self.config.model_names())
            name = resolved.name
        done = trio.Event()
        try:
            await self._send.send(Unload(done, name))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True
        if not wait:
            return done.is_set()  # it has only been sent: as good as always False
        with trio.move_on_after(self.unload_timeout):
            await done.wait()
        return done.is_set()

    async def keep_alive(self, name: str, seconds: float | None) -> None:
        """Keep profile ``name`` loaded ``seconds`` once idle, instead of its TTL: 0
        unloads it as soon as no request holds or waits for it, ``math.inf`` never, None
        goes back to the TTL. Until the model stops or the next call; a pinned model
        stays. Without effect on a model that is not running."""
        with trio.move_on_after(REPLY_TIMEOUT), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send.send(KeepAlive(name, seconds))

    def idle_ttl(self, name: str) -> float | None:
        """Seconds the running ``name`` stays loaded once idle; None: until evicted."""
        child = self._children.get(name)
        if child is None:
            ttl = self.config.profiles[name].ttl if name in self.config.profiles else None
            return (ttl if ttl is not None else self.config.ttl) or None
        return self._idle_ttl(child)

    def failed_exit_code(self, name: str) -> int | None:
        """The exit code of ``name``'s last failed start or child, as counted for its
        circuit (None: it left none, or nothing failed)."""
        health = self.health.get(name)
        return health.exit_code if health is not None else None

    def kill_now(self) -> None:
        """Kill every child at once (a second SIGTERM); never counted as a crash.

        A command on the channel; should ``run`` end before the loop reads it, its last
        cleanup kills instead of stopping gracefully.
        """
        self._kill_requested = True
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError,
                                 trio.ClosedResourceError):
            self._send.send_nowait(Kill())

    @property
    def unload_timeout(self) -> float:
        """The longest an unload may take: drain, a cache save, the stop grace."""
        timeouts = self.config.timeouts
        return timeouts.drain + timeouts.stop + SLOT_TIMEOUT + UNLOAD_MARGIN

    async def reload(self, config: Config) -> dict[str, Any]:
        """Adopt a new, already validated config; returns what changed.

        A resident model keeps serving if its profile and the llama_server settings
        are unchanged. A changed one keeps serving until it is evicted; a removed one is
        unloaded once idle. Requests waiting for a removed profile get 404.
        """
        reply_send, reply_receive = trio.open_memory_channel[dict[str, Any] | LeaseError](1)
        result: dict[str, Any] | LeaseError = ShuttingDown()
        with trio.move_on_after(REPLY_TIMEOUT):
            try:
                await self._send.send(Reload(config, reply_send))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ShuttingDown() from None
            result = await reply_receive.receive()  # answered by the loop or its exit
        if isinstance(result, LeaseError):
            raise result
        return result

    async def shutdown(self) -> None:
        """Ask ``run`` to drain, stop the children and return."""
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
        return sum(1 for queue in self._waiting.values() for w in queue if not w.internal)

    @property
    def n_inflight(self) -> int:
        return sum(len(child.leases) for child in self._children.values())

    def waiting_by_profile(self) -> dict[str, int]:
        counts = {name: sum(1 for w in q if not w.internal) for name, q in self._waiting.items()}
        return {name: n for name, n in counts.items() if n}

    def load_progress(self, name: str | None = None) -> tuple[float, float | None]:
        """Seconds since the start of ``name`` (default: the current child) began, and the
        expected total if known."""
        child = self._children.get(name) if name is not None else self._current()
        if child is None or child.state is not State.STARTING or child.start_began is None:
            return 0.0, None
        return (trio.current_time() - child.start_began,
                self.load_seconds.get(child.name))

    def budgets(self) -> dict[int, int]:
        """Bytes plans may fill on each GPU (``planner.UNLIMITED`` in count mode)."""
        residency = self.config.residency
        ids = [gpu.id for gpu in self.config.gpus] or [0]
        if residency.mode != "budget":
            ids += [g for p in self.config.profiles.values() for g in p.gpu]
            return dict.fromkeys(sorted(set(ids)), planner.UNLIMITED)
        if self.config.gpus:
            return {gpu.id: max(0, gpu.memory - residency.reserve) for gpu in self.config.gpus}
        memory = self.config.memory.gpu or self._detected_gpu or 0
        return {0: max(0, memory - residency.reserve)}

    def resident(self) -> list[dict[str, Any]]:
        """Each child, for ``/swapd/status``: most recently used first."""
        now = trio.current_time()
        rows = []
        for child in self.children():
            proc = child.proc
            size = self.sizes.get(child.name)
            elapsed, expected = self.load_progress(child.name)
            rows.append({
                "name": child.name, "state": child.state.value,
                "draining": child.draining_since is not None,
                "pid": proc.pid if proc else None, "port": proc.port if proc else None,
                "gpus": list(child.gpus), "planned": sum(child.usage.values()),
                "footprint": {"estimate": size.estimate if size else None,
                              "measured": child.measured.gpu_total if child.measured
                              else (size.measured if size else None)},
                "inflight": len(child.leases),
                "idle_seconds": None if child.leases else round(now - child.idle_since, 3),
                "last_used": child.last_used, "pinned": child.profile.pinned,
                "load_elapsed": elapsed, "load_expected": expected})
        return rows

    def footprint_of(self, name: str) -> dict[str, Any] | None:
        """What the planner counts for a profile, and why (budget mode, once sized)."""
        sized = self.sizes.get(name)
        if sized is None:
            return None
        return {"planned": sized.footprint, "source": sized.source,
                "estimate": sized.estimate, "measured": sized.measured}

    def gpu_status(self) -> list[dict[str, Any]]:
        """Per GPU: its budget, the bytes planned for resident models, and measured."""
        rows = []
        for gpu, budget in sorted(self.budgets().items()):
            planned = sum(c.usage.get(gpu, 0) for c in self._children.values())
            measured = 0
            for child in self._children.values():
                if child.measured is None:
                    continue
                for index, used in enumerate(sorted(child.usage)):
                    if used == gpu:
                        measured += child.measured.on_gpus().get(f"CUDA{index}", 0)
            rows.append({"id": gpu, "budget": None if budget == planner.UNLIMITED else budget,
                         "planned": planned, "measured": measured})
        return rows

    def status(self) -> dict[str, Any]:
        """What ``/swapd/status`` shows: a read-only view computed on demand."""
        child = self._current()
        proc = child.proc if child is not None else None
        error = self.last_error
        elapsed, expected = self.load_progress()
        return {
            "state": self.state.value,
            "active": child.name if child is not None else None,
            "pid": proc.pid if proc else None,
            "port": proc.port if proc else None,
            "uptime": (trio.current_time() - proc.ready_at) if proc and proc.ready_at else None,
            "inflight": self.n_inflight,
            "waiting": self.waiting_by_profile(),
            "draining": child is not None and child.draining_since is not None,
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
            "resident": self.resident(),
            "gpus": self.gpu_status(),
            "residency": {"mode": self.config.residency.mode,
                          "max_models": self.config.residency.cap},
            "evictions": dict(self.evictions),
            **self.stats,
        }

    # ----------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        async with self._receive:
            self._schedule()  # pinned and preload models: wanted from the start
            while not (self._shutting_down and self._ready_to_exit()):
                with trio.CancelScope(deadline=self._next_deadline()) as self._timer:
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
                    case Load(_, reply):
                        reply.send_nowait(ShuttingDown())

    def _handle(self, message: Message) -> None:
        match message:
            case Acquire(name, waiter):
                self._on_acquire(name, waiter)
            case Release(lease):
                self._return_lease(lease)
            case Withdraw(waiter):
                self._on_withdraw(waiter)
            case Unload(done, name):
                self._on_unload(done, name)
            case Load(name, reply):
                reply.send_nowait(self._on_load(name))
            case KeepAlive(name, seconds):
                child = self._children.get(name)
                if child is not None:
                    child.keep_alive = seconds  # acted on by _on_timers, right after
            case Kill():
                self._on_kill()
            case Shutdown():
                self._shutting_down = True
                self._fail_all_waiters(ShuttingDown())
            case Reload(config, reply):
                reply.send_nowait(self._on_reload(config))
            case Checked(profile, problem):
                self._on_checked(profile, problem)
            case Sized(profile):
                self._sizing.discard(profile.name)
                if self.config.profiles.get(profile.name) == profile:
                    self.sizes[profile.name] = message
            case StartDone(profile, proc, error, context):
                self.phase = None
                child = self._children.get(profile.name)
                if child is None or child.state not in (State.STARTING, State.STOPPING):
                    return  # not possible: a child leaves STARTING only through here
                if (context is not None and error is None
                        and self.config.profiles.get(profile.name) == profile):
                    self.contexts[profile.name] = context
                self._on_start_done(child, proc, error)
                if proc is not None and child.proc is proc and _ready(child):
                    assert self._nursery is not None
                    self._nursery.start_soon(self._probe_health, child, proc)
                    self._nursery.start_soon(self._run_measure, child.profile, proc)
            case Measured(proc, footprint):
                child = self._children.get(proc.name)
                if child is not None and child.proc is proc and child.state is State.READY:
                    self._on_measured(child, footprint)
            case Phase(text):
                self.phase = text
                self._publish("phase", text=text, profile=message.profile)
            case Stopped(proc):
                self.phase = None
                child = self._children.get(proc.name)
                if child is not None and child.proc is proc:
                    self._on_stopped(child)
            case Exited(proc):
                self._on_exited(proc)
            case Hung(proc, why):
                self._on_hung(proc, why)

    def _on_acquire(self, name: str | None, waiter: Waiter) -> None:
        profile = self._target(name)
        if not isinstance(profile, Profile):
            self._answer(waiter, profile)
            return
        waiter.profile = profile.name
        child = self._children.get(profile.name)
        if child is not None and self._can_grant(child):
            self._grant(child, waiter)
            return
        if waiter.ready_only:
            self._answer(waiter, NotReadyNow(f"model {profile.name!r} is not ready now"))
            return
        refusal = self._queue_refusal(profile)
        if refusal is not None:
            self._answer(waiter, refusal)
            return
        self._waiting.setdefault(profile.name, deque()).append(waiter)
        self._publish("queued", profile=profile.name, waiting=self.n_waiting)

    def refusal(self, name: str | None) -> LeaseError | None:
        """What ``acquire(name)`` would refuse at once, if the model is not ready now:
        so that a request that will not wait is refused before it is told to (a
        streaming chat's early 200). A read-only peek, like ``serving``."""
        profile = self._target(name)
        if not isinstance(profile, Profile):
            return profile
        child = self._children.get(profile.name)
        if child is not None and self._can_grant(child):
            return None
        return self._queue_refusal(profile)

    def _target(self, name: str | None) -> Profile | LeaseError:
        """The profile a request for ``name`` is for, or why there is none."""
        if self._shutting_down:
            return ShuttingDown()
        if name is None:
            active = self.active
            if active is None:
                return NoModelLoaded(list(self.config.profiles))
            if active.name not in self.config.profiles:  # removed, going away
                return UnknownModel(active.name, self.config.model_names())
            return active
        resolved = self.config.resolve(name)
        if not isinstance(resolved, Profile):
            return UnknownModel(name, self.config.model_names())
        return resolved

    def _queue_refusal(self, profile: Profile) -> LeaseError | None:
        """Why a request for a model that is not ready may not wait for it, if it may not."""
        refusal = self._circuit_refusal(profile.name)
        if refusal is not None:
            return refusal
        if self.n_waiting >= self.config.queue.max_waiting:
            return QueueFull(self.config.queue.max_waiting, retry_after=self._retry_after())
        return None

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
        """A lease came back; the last one out starts the child's idle clock (TTL)."""
        child = self._children.get(lease.profile.name)
        if child is not None and lease in child.leases:
            child.leases.discard(lease)
            self._touch(child)
            if not child.leases:
                child.idle_since = child.last_used

    def _on_unload(self, done: trio.Event, name: str | None) -> None:
        """Unload one profile (by name: pinned too) or every model but the pinned."""
        if name is None:
            names = {n for n, c in self._children.items() if not c.profile.pinned}
            failed = list(self._failed)
        else:
            names = {name} if name in self._children else set()
            failed = [name] if name in self._failed else []
        for profile in failed:
            # Unload is about the process: none runs, so the state is IDLE. The
            # profile's failure record (backoff, circuit) and last_error stay: they are
            # facts about the profile, which unload does not fix.
            self._transition(State.IDLE, profile=profile)
        self._unloading |= names
        self._unloads.append((frozenset(names), done))

    def _on_load(self, name: str) -> LeaseError | None:
        """Want ``name`` loaded (once) unless it is up, loading, or may not load."""
        profile = self._target(name)
        if not isinstance(profile, Profile):
            return profile
        refusal = self._circuit_refusal(profile.name)
        if refusal is not None:
            return refusal
        child = self._children.get(profile.name)
        if child is not None and child.state in (State.STARTING, State.READY) \
                and child.draining_since is None and profile.name not in self._unloading:
            return None  # up or coming up: nothing to want
        if not any(w.internal for w in self._waiting.get(profile.name, ())):
            self._want(profile)
        return None

    def _on_kill(self) -> None:
        """A second SIGTERM: every child is killed now. Its exit is a stop, not a crash."""
        for child in list(self._children.values()):
            self._revoke(child, "swapd stopped at once, without waiting for requests")
            if child.state is State.STARTING:
                self._cancel_start(child, "shutdown")
            elif child.state is State.READY:
                self._begin_stop(child, "shutdown")
            if child.proc is not None:
                child.proc.kill_now()

    def _on_start_done(self, child: Child, proc: process.LlamaProcess | None,
                       error: StartError | None) -> None:
        profile = child.profile
        child.start_scope = None
        if child.state is State.STOPPING:  # a cancelled start
            if proc is not None and proc.alive:  # it won the race: stop it like any other
                assert self._nursery is not None
                child.proc = proc
                self._nursery.start_soon(self._run_stop, proc, None)
                return
            self._transition(State.IDLE, child)
            self._forget(child)
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
            if self._retry_after_oom(child, error):
                return
            self._transition(State.FAILED, child)
            self._forget(child, failed=True)
            self._start_failed(profile, error, child)
            self._record_load(child, "failed")
            return
        assert proc.ready_at is not None
        seconds = proc.ready_at - proc.started_at
        self.load_seconds[profile.name] = seconds
        _write_load_times(self.config, self.load_seconds, self.state_writes)
        child.proc = proc
        self._transition(State.READY, child)
        self._touch(child)
        child.idle_since = child.last_used
        self._recent = profile.name
        self._record_load(child, "ok")
        health = self.health.get(profile.name)
        if health is not None and health.opened_at is not None:
            health.opened_at = None  # the trial worked; its failures stay until stable
            self._publish("circuit_closed", profile=profile.name)
        self._publish("ready", profile=profile.name, pid=proc.pid, load_seconds=seconds)

    def _on_measured(self, child: Child, measured: Footprint) -> None:
        """What a ready child really allocated: shown, and planned with in budget mode."""
        child.measured = measured
        if measured.gpu_total and self.config.residency.mode == "budget":
            # From now on the planner counts what llama-server really allocated, for
            # this child and for the next loads of the profile.
            child.usage = _spread(measured, child.gpus) or child.usage
            old = self.sizes.get(child.name)
            self.sizes[child.name] = Sized(child.profile, measured.gpu_total, "measured",
                                           old.estimate if old else None, measured.gpu_total)
        self._publish("measured", profile=child.name, gpu_bytes=measured.gpu_total)

    def _retry_after_oom(self, child: Child, error: StartError) -> bool:
        """An out-of-memory start while idle models are resident: evict them, retry once.

        Estimates can be wrong (another program took memory, a build allocates more): the
        planner thought it fit. Returns True when a retry was arranged (no failure counted).
        """
        name = child.name
        if name in self._oom_retry:
            self._oom_retry.discard(name)  # this was the retry: count the failure
            return False
        if not process.is_oom(error.stderr_tail or []):
            return False
        victims = sorted((c for c in self._children.values()
                          if c is not child and c.state is State.READY and not c.leases
                          and c.draining_since is None and not c.profile.pinned
                          and not self._waiting.get(c.name)),
                         key=lambda c: c.use_seq)
        if not victims:
            return False
        self._oom_retry.add(name)
        self._transition(State.STOPPING, child)  # the failed start, retried below
        self._transition(State.IDLE, child)
        self._forget(child)
        names = [v.name for v in victims]
        log.warning("%s ran out of memory while loading; evicting %s and retrying once",
                    name, ", ".join(names))
        self._publish("oom_retry", profile=name, evicted=names,
                      message=str(error).splitlines()[0])
        self._room.setdefault(name, {"from": []})
        for victim in victims:
            self._room[name]["from"].append(victim.name)
            victim.room_for = name
            self._begin_stop(victim, "oom")
        return True

    def _start_failed(self, profile: Profile, error: StartError,
                      child: Child | None = None) -> None:
        """A start failed, or its preflight refused it: count it, tell its waiters."""
        self.last_error, self.last_error_at = error, self._wall()
        self.stats["starts_failed"] += 1
        log.error("%s", error)
        message = str(error).splitlines()[0]
        swap = bool(child is not None and child.swap.get("from"))
        self._publish("start_failed", fact=LoadFailed(profile.name, message, error.exit_code,
                                                      swap),
                      profile=profile.name, exit_code=error.exit_code, message=message)
        self._record_failure(profile.name, message, error.exit_code)
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
        # Refused before anything was drained or stopped for it: the resident models
        # never noticed; no state machine has anything to do.
        self._start_failed(profile, StartFailed(profile.name, problem))

    def _launch_checks(self) -> None:
        """While a model is ready, check each other profile with waiters before anything
        may be drained or stopped for it (with nothing to stop, the start checks first)."""
        assert self._nursery is not None
        for name in [n for n in self._cleared if not self._waiting.get(n)]:
            del self._cleared[name]  # nobody waits: by the next request it may be stale
        if not any(c.state is State.READY for c in self._children.values()):
            return
        for name, queue in self._waiting.items():
            profile = self.config.profiles.get(name)
            if (not queue or profile is None or name in self._checking
                    or name in self._children or self._cleared.get(name) == profile):
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
            self.sizes.pop(name, None)
            self.contexts.pop(name, None)
        for name in removed:
            for waiter in self._waiting.pop(name, deque()):
                self._answer(waiter, UnknownModel(name, new.model_names()))
        active = self.active.name if self.active else None
        kept = []
        for child in list(self._children.values()):
            name = child.name
            if name not in changed and name not in removed:
                child.profile = new.profiles[name]  # same definition: keeps serving as is
                kept.append(name)
            elif child.state is State.STARTING:
                # Removed or changed while it loads: nobody may use what it would become.
                # Stop it (once ready, if it wins the race); waiters of a changed profile
                # stay queued and get a start of its new definition.
                log.info("stopping the start of %s: the reload %s it", name,
                         "removed" if name in removed else "changed")
                self._cancel_start(child, "reload")
            # A removed ready child is unloaded once its requests are done (_stop_reason);
            # a changed one keeps serving until it is evicted.
        summary: dict[str, Any] = {"added": added, "removed": removed, "changed": changed,
                   "active": active, "active_kept": active is not None and active in kept}
        log.info("config reloaded: %s", summary)
        self._publish("reloaded", **summary)
        return summary

    def _record_load(self, child: Child, result: str) -> None:
        now = trio.current_time()
        swap = child.swap
        began = swap.get("began", now)
        stopped = swap.get("stopped", began)
        from_ = list(swap.get("from") or [])
        self.history.append({
            "at": self._wall(), "from": ", ".join(from_) or None, "to": child.name,
            "result": result, "stop_seconds": round(stopped - began, 4),
            "load_seconds": round(now - stopped, 4), "total_seconds": round(now - began, 4)})
        if result == "ok":
            load_s = self.load_seconds.get(child.name, now - stopped)  # spawn to healthy
            context = self.contexts.get(child.name)
            self._publish("loaded", fact=Loaded(child.name, child.gpus, load_s, context),
                          profile=child.name, gpus=list(child.gpus), context=context)
            if from_:
                self._publish("swapped", fact=Swapped(tuple(from_), child.name,
                                                       round(stopped - began, 4),
                                                       round(now - stopped, 4)),
                              profile=child.name, **{"from": from_},
                              stop_s=round(stopped - began, 4), load_s=round(now - stopped, 4))
        child.swap = {}

    def _on_exited(self, proc: process.LlamaProcess) -> None:
        child = self._children.get(proc.name)
        if child is None or proc is not child.proc or child.state is not State.READY:
            return  # a stop or a failed start we already account for
        self._forget_if_stable(child)  # a crash after a long run starts a new count
        error = ModelCrashed(proc.name, proc.exit_code, list(proc.tail)[-15:],
                             process.describe_exit(proc.exit_code))
        log.error("%s; last output:\n%s", error, "\n".join(error.stderr_tail))
        self.last_error, self.last_error_at = error, self._wall()
        self.stats["crashes"] += 1
        proc.kill_now()  # whatever it left behind in its group
        self._revoke(child, str(error))
        self._transition(State.FAILED, child)
        self._forget(child, failed=True)
        self._publish("crashed", fact=Crashed(proc.name, proc.exit_code, False),
                      profile=proc.name, exit_code=proc.exit_code)
        self._record_failure(proc.name, str(error), proc.exit_code)
        self._want_again(child.profile)

    def _on_hung(self, proc: process.LlamaProcess, why: str) -> None:
        """A ready child stopped answering: kill it and treat it like a crash."""
        child = self._children.get(proc.name)
        if child is None or proc is not child.proc or child.state is not State.READY:
            return  # it already exited or is being stopped
        error = ModelHung(proc.name, why, list(proc.tail)[-15:])
        log.error("%s", error)
        self.last_error, self.last_error_at = error, self._wall()
        self.stats["hangs"] += 1
        # SIGKILL, not SIGTERM: a stopped process would not act on SIGTERM until
        # continued, a deadlocked one maybe never. _watch reaps it.
        proc.kill_now()
        self._revoke(child, str(error))
        self._transition(State.FAILED, child)
        self._forget(child, failed=True)
        self._publish("hung", fact=Crashed(proc.name, proc.exit_code, True),
                      profile=proc.name, pid=proc.pid, message=str(error))
        self._record_failure(proc.name, str(error), proc.exit_code)
        self._want_again(child.profile)

    def _on_stopped(self, child: Child) -> None:
        """A child's process is gone after a stop: forget it; a load it made room for
        may start now (the next ``_schedule`` plans again)."""
        if child.room_for is not None and child.room_for in self._room:
            self._room[child.room_for]["stopped"] = trio.current_time()
        proc = child.proc
        self._transition(State.IDLE, child)
        self._forget(child)
        self._publish("stopped", profile=child.name,
                      exit_code=proc.exit_code if proc is not None else None)

    def _revoke(self, child: Child, why: str) -> None:
        for lease in child.leases:
            lease.revoked_because = why
            lease.scope.cancel()
        child.leases.clear()

    def _forget(self, child: Child, *, failed: bool = False) -> None:
        """The child is gone (its machine reached IDLE or FAILED)."""
        if self._children.get(child.name) is child:
            del self._children[child.name]
        self._unloading.discard(child.name)
        if failed:
            self._failed[child.name] = trio.current_time()
            self._recent = child.name
            if child.name not in self.config.profiles:
                # A reload removed it and asked for its unload: that is done now.
                self._transition(State.IDLE, profile=child.name)
        elif self._recent == child.name:
            self._recent = None

    # ------------------------------------------------------------- scheduling

    def serving(self, name: str | None) -> bool:
        """Would a request for ``name`` be granted without waiting? A read-only peek."""
        if name is None:
            child = self._current()
        else:
            profile = self.config.resolve(name)
            child = self._children.get(profile.name) if isinstance(profile, Profile) else None
        return child is not None and self._can_grant(child)

    def _can_grant(self, child: Child) -> bool:
        return (child.state is State.READY and child.draining_since is None
                and self._stop_reason(child) is None)

    def _stop_reason(self, child: Child) -> str | None:
        """Why this child must go as soon as its requests are done, if it must."""
        if self._shutting_down:
            return "shutdown"
        if child.name in self._unloading:
            return "unload"
        if child.name not in self.config.profiles:
            return "reload"  # removed by a reload
        return None

    def _schedule(self) -> None:
        """Decide the next steps from the current state; called after every message."""
        for child in list(self._children.values()):
            self._step(child)
        self._finish_unloads()
        if self._shutting_down:
            return
        now = trio.current_time()
        for name in [n for n, q in self._waiting.items() if q]:
            refusal = self._circuit_refusal(name)
            if refusal is not None:  # opened while they waited
                for waiter in self._waiting.pop(name):
                    self._answer(waiter, refusal)
        for name in [n for n in self._room if not self._waiting.get(n)
                     and n not in self._children]:
            del self._room[name]  # whoever it made room for is gone: no swap to record
        heads = sorted(((q[0], n) for n, q in self._waiting.items()
                        if q and n not in self._children), key=lambda h: h[0].enqueued)
        for head, name in heads:
            profile = self.config.profiles.get(name)
            if profile is None or now < self._retry_at(name):
                continue
            if any(c.room_for == name for c in self._children.values()):
                continue  # room is being made for it: plan again once those are gone
            footprint = self._footprint(profile)
            if footprint is None:
                continue  # being sized off-loop: a Sized message wakes us
            target = planner.Target(name, footprint, profile.gpu)
            decision = planner.plan(target, self._residents(), self.budgets(),
                                    max_models=self.config.residency.cap)
            match decision:
                case planner.Load(usage, ()):
                    self._begin_start(profile, dict(usage))
                case planner.Load(_, evict) if self._cleared_for_start(name):
                    self._make_room(name, [self._children[v] for v in evict])
                case planner.Wait(blocking) if (self._cleared_for_start(name)
                                                and now - head.enqueued
                                                >= self.config.queue.starvation_bound):
                    self._drain_for(target, blocking)
                case planner.Never(reason):
                    log.warning("%s cannot be loaded: %s", name, reason)
                    error = WontFit(name, reason)
                    for waiter in self._waiting.pop(name, deque()):
                        self._answer(waiter, error)
                    self._publish("wont_fit", profile=name, message=reason)

    def _step(self, child: Child) -> None:
        """One child's next step: grant its waiters, drain, stop, or cancel its start."""
        reason = self._stop_reason(child)
        if child.state is State.STARTING:
            if reason is not None:
                self._cancel_start(child, reason)
            return
        if child.state is not State.READY:
            return
        if reason is not None and (child.draining_since is None
                                   or child.drain_reason == "room"):
            self._drain(child, reason)
        if child.draining_since is None:
            self._grant_waiters(child)
        elif child.drain_reason == "room" and not self._room_wanted(child):
            # Whoever it drained for is gone (timed out, left, removed, loaded elsewhere):
            # serve on rather than cut its in-flight requests at the deadline for nobody.
            child.draining_since = child.drain_reason = None
            child.room_for = None
            self._publish("drain_cancelled", profile=child.name)
            self._grant_waiters(child)
        if child.draining_since is not None and not child.leases:
            self._begin_stop(child, child.drain_reason or "room")

    def _grant_waiters(self, child: Child) -> None:
        for waiter in self._waiting.pop(child.name, deque()):
            self._grant(child, waiter)

    def _room_wanted(self, child: Child) -> bool:
        """Does the load this child drains for still wait (cleared, not started)?"""
        target = child.room_for
        return (target is not None and target not in self._children
                and bool(self._waiting.get(target)) and self._cleared_for_start(target))

    def _drain(self, child: Child, reason: str, room_for: str | None = None) -> None:
        """Mark a ready child draining: no new grants; stopped once its leases are back."""
        if child.draining_since is None:
            child.draining_since = trio.current_time()
            self._publish("draining", profile=child.name, inflight=len(child.leases))
        child.drain_reason = reason
        child.room_for = room_for

    def _make_room(self, target: str, victims: Sequence[Child]) -> None:
        """Stop these idle models so that ``target`` fits (the planner chose them)."""
        record = self._room.setdefault(target, {"from": []})
        for victim in victims:
            record["from"].append(victim.name)
            if victim.leases:
                self._drain(victim, "room", room_for=target)
            else:  # idle: stopped at once
                victim.drain_reason, victim.room_for = "room", target
                self._begin_stop(victim, "room")

    def _drain_for(self, target: planner.Target, blocking: Sequence[str]) -> None:
        """Past the starvation bound: drain the fewest busy models that make room."""
        residents = self._residents()
        drainable = {n for n in blocking if n in self._children
                     and self._children[n].state is State.READY
                     and self._children[n].draining_since is None
                     and not self._children[n].profile.pinned}
        if not drainable:
            return
        as_idle = [attrs.evolve(r, inflight=0, waiting=0) if r.name in drainable else r
                   for r in residents]
        decision = planner.plan(target, as_idle, self.budgets(),
                                max_models=self.config.residency.cap)
        if isinstance(decision, planner.Load) and decision.evict:
            self._make_room(target.name, [self._children[v] for v in decision.evict])

    def _residents(self) -> list[planner.Resident]:
        """The planner's snapshot of every child."""
        residents = []
        for child in self._children.values():
            if child.state is State.STARTING:
                phase = planner.Phase.STARTING
            elif child.state is State.READY and child.draining_since is None:
                phase = planner.Phase.READY
            else:
                phase = planner.Phase.STOPPING
            residents.append(planner.Resident(
                child.name, dict(child.usage), inflight=len(child.leases),
                waiting=len(self._waiting.get(child.name, ())), last_used=child.use_seq,
                pinned=child.profile.pinned, phase=phase))
        return residents

    def _footprint(self, profile: Profile) -> int | None:
        """Bytes ``profile`` is planned to take; None while it is sized off-loop."""
        if self.config.residency.mode != "budget":
            return 0  # count mode: only the count matters
        sized = self.sizes.get(profile.name)
        if sized is not None and sized.profile == profile:
            return sized.footprint
        if profile.memory is not None and not self.footprints.has(profile.name):
            # Nothing measured to prefer: the operator's figure, no I/O needed.
            self.sizes[profile.name] = Sized(profile, profile.memory, "memory", None, None)
            return profile.memory
        if profile.name not in self._sizing:
            assert self._nursery is not None
            self._sizing.add(profile.name)
            self._nursery.start_soon(self._run_size, profile)
        return None

    def _next_deadline(self) -> float:
        """When the loop must wake without a message: starvation, drain, TTL, backoff,
        and the end of a ready model's probation (``restart.stable_after``)."""
        deadlines = [math.inf]
        bound = self.config.queue.starvation_bound
        for name, queue in self._waiting.items():
            if queue and name not in self._children:
                deadlines.append(self._retry_at(name))
                if self._cleared_for_start(name):
                    deadlines.append(queue[0].enqueued + bound)
        for child in self._children.values():
            if child.state is not State.READY:
                continue
            deadlines.append(self._stable_at(child))
            if child.draining_since is None:
                ttl = self._idle_ttl(child)
                if ttl is not None and not child.leases and not self._waiting.get(child.name):
                    deadlines.append(child.idle_since + ttl)
            elif child.leases:
                deadlines.append(child.draining_since + self.config.timeouts.drain)
        now = trio.current_time()
        # A deadline already passed was acted on (or cannot be yet): do not spin on it.
        future = [d for d in deadlines if d > now]
        return min(future) if future else math.inf

    def _on_timers(self) -> None:
        now = trio.current_time()
        for child in list(self._children.values()):
            if child.state is not State.READY:
                continue
            self._forget_if_stable(child)
            if child.draining_since is not None:
                drain = self.config.timeouts.drain
                if child.leases and now >= child.draining_since + drain:
                    why = (f"{self._drain_cause(child)} and the request did not finish "
                           f"within timeouts.drain ({drain:g}s)")
                    log.warning("cutting %d request(s): %s", len(child.leases), why)
                    self._revoke(child, why)
                continue
            ttl = self._idle_ttl(child)
            if (ttl is not None and not child.profile.pinned and not child.leases
                    and not self._waiting.get(child.name) and now >= child.idle_since + ttl):
                log.info("unloading %s after %gs idle (%s)", child.name, ttl,
                         "ttl" if child.keep_alive is None else "a client's keep_alive")
                self._publish("ttl_expired", profile=child.name)
                self._begin_stop(child, "ttl")

    def _drain_cause(self, child: Child) -> str:
        """Why a child is draining, in the words its cut requests will read.

        A TTL unload never cuts anyone: it begins only when no request is in flight.
        """
        name = child.name
        if self._shutting_down:
            return "swapd is shutting down"
        if name not in self.config.profiles:  # a reload took it out: _on_reload
            return f"model {name!r} was removed from the config by a reload"
        if name in self._unloading:
            return f"model {name!r} is being unloaded (swapd unload / POST /swapd/unload)"
        if child.room_for is not None:
            return f"model {name!r} is being swapped out for {child.room_for!r}"
        return f"model {name!r} is being stopped"

    def _record_failure(self, name: str, why: str, exit_code: int | None) -> None:
        """Count a failed start or crash: back off, and open the circuit at the limit."""
        if name not in self.config.profiles:
            return  # removed by a reload: no circuit (or metric) for a gone profile
        restart = self.config.restart
        health = self.health.setdefault(name, ProfileHealth())
        health.failures += 1
        health.last_error, health.exit_code = why, exit_code
        now = trio.current_time()
        delay = min(restart.backoff * 2 ** (health.failures - 1), restart.backoff_max)
        health.retry_at = now + delay
        if health.failures >= restart.max_failures:
            health.opened_at = now
            log.error("circuit open for %s after %d consecutive failures; next try in %gs",
                      name, health.failures, restart.cooldown)
            self._publish("circuit_open", profile=name, failures=health.failures,
                          cooldown=restart.cooldown)

    def _stable_at(self, child: Child) -> float:
        """When a ready child's failures are forgotten (inf: none to forget)."""
        proc = child.proc
        if (child.state is not State.READY or proc is None or proc.ready_at is None
                or child.name not in self.health):
            return math.inf
        return proc.ready_at + self.config.restart.stable_after

    def _forget_if_stable(self, child: Child) -> None:
        """The child has stayed up ``restart.stable_after``: its failures are over."""
        if trio.current_time() >= self._stable_at(child):
            del self.health[child.name]
            log.info("%s has been up %gs; its earlier failures are forgotten",
                     child.name, self.config.restart.stable_after)

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

    def _idle_ttl(self, child: Child) -> float | None:
        """Seconds ``child`` may stay idle before it unloads; None: no limit."""
        if child.keep_alive is not None:
            return None if math.isinf(child.keep_alive) else child.keep_alive
        return self._ttl(child.profile) or None

    def _retry_after(self) -> float:
        active = self.active
        expected = self.load_seconds.get(active.name) if active else None
        return max(1.0, round(expected or 5.0))

    # ------------------------------------------------------------- transitions

    def _transition(self, new: State, child: Child | None = None, *,
                    profile: str | None = None) -> None:
        """Move one child (or a profile with no child: FAILED -> IDLE) to ``new``."""
        if child is not None:
            old, name = child.state, child.name
        elif profile is not None:
            old, name = self.profile_state(profile), profile
        else:
            old, name = self.state, None
        if not allowed(old, new):
            raise IllegalTransition(f"{old.name} -> {new.name}")
        log.debug("state of %s %s -> %s", name, old.name, new.name)
        if child is not None:
            child.state = new
        elif profile is not None and new is State.IDLE:
            self._failed.pop(profile, None)
        self._publish("state", state=new.value, profile=name)

    def _touch(self, child: Child) -> None:
        """The child was just used (granted, released, loaded): most recent now."""
        self._uses += 1
        child.use_seq = self._uses
        child.last_used = trio.current_time()

    def _grant(self, child: Child, waiter: Waiter) -> None:
        if waiter.internal:  # a pinned/preload want: the model is loaded, nothing to hold
            waiter.answered = True
            return
        lease = self._new_lease(child)
        waiter.lease = lease
        self._answer(waiter, lease)

    def _new_lease(self, child: Child) -> Lease:
        assert child.proc is not None
        lease = Lease(child.profile, child.proc)
        child.leases.add(lease)
        self._touch(child)
        self._recent = child.name
        return lease

    def _answer(self, waiter: Waiter, result: Lease | LeaseError) -> None:
        if waiter.answered:
            return
        waiter.answered = True
        try:
            waiter.reply.send_nowait(result)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            if isinstance(result, Lease):
                self._return_lease(result)

    def _fail_all_waiters(self, error: LeaseError) -> None:
        for queue in self._waiting.values():
            for waiter in queue:
                self._answer(waiter, error)
        self._waiting.clear()

    def _begin_start(self, profile: Profile, usage: dict[int, int]) -> None:
        assert self._nursery is not None
        now = trio.current_time()
        child = Child(profile, state=self.profile_state(profile.name), usage=dict(usage),
                      idle_since=now, last_used=now, start_began=now)
        record = self._room.pop(profile.name, None)
        if record is not None and record.get("from"):
            record.setdefault("began", now)
            record.setdefault("stopped", now)
            child.swap = record
        else:
            child.swap = {"from": None, "began": now, "stopped": now}
        self._children[profile.name] = child
        self._touch(child)
        self._recent = profile.name
        self._cleared.pop(profile.name, None)  # each start is checked afresh
        self._transition(State.STARTING, child)
        self._failed.pop(profile.name, None)
        self._publish("starting", profile=profile.name,
                      expected_seconds=self.load_seconds.get(profile.name),
                      gpus=list(child.gpus))
        scope = trio.CancelScope()
        child.start_scope = scope
        self._nursery.start_soon(self._run_start, child, scope)

    def _begin_stop(self, child: Child, reason: str) -> None:
        assert self._nursery is not None and child.proc is not None
        if reason == "room":  # a stop so that another model can load: a swap
            self.stats["swaps"] += 1
        if child.room_for is not None and child.room_for in self._room:
            self._room[child.room_for].setdefault("began", trio.current_time())
        self.evictions[reason] = self.evictions.get(reason, 0) + 1
        self._transition(State.STOPPING, child)
        child.draining_since = None
        self._publish("evicted", fact=Evicted(child.name, reason), profile=child.name,
                      reason=reason)
        self._publish("stopping", profile=child.name)
        self._nursery.start_soon(self._run_stop, child.proc, child.profile)

    def _cancel_start(self, child: Child, reason: str) -> None:
        if child.start_scope is not None:
            child.start_scope.cancel()
        self._transition(State.STOPPING, child)

    def _finish_unloads(self) -> None:
        for entry in list(self._unloads):
            names, done = entry
            if not names & self._children.keys():
                done.set()
                self._unloads.remove(entry)

    def _ready_to_exit(self) -> bool:
        return not self._children

    def _publish(self, kind: str, *, fact: Fact | None = None, **data: Any) -> None:
        self._seq += 1
        self.events.append(Event(self._seq, self._wall(), kind, data, fact))
        self._changed.set()
        self._changed = trio.Event()

    # ----------------------------------------------------------- helper tasks

    def _placed(self, child: Child) -> Profile:
        """The profile as launched: ``CUDA_VISIBLE_DEVICES`` set to the plan's GPUs (and
        an even ``--tensor-split`` for a split) when swapd places models on GPUs."""
        profile = child.profile
        gpus = child.gpus
        if not gpus or not (self.config.gpus or len(self.budgets()) > 1):
            return profile  # no gpus configured: touch nothing (one GPU, as ever)
        env = {**profile.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
        flags = dict(profile.flags)
        if len(gpus) > 1 and not any(_is_flag(k, "tensor-split") for k in flags):
            flags["tensor-split"] = ",".join("1" for _ in gpus)
        return attrs.evolve(profile, env=env, flags=flags)

    async def _run_start(self, child: Child, scope: trio.CancelScope) -> None:
        profile = child.profile
        timeouts = self.config.timeouts
        proc: process.LlamaProcess | None = None
        error: StartError | None = None
        handed_over = False
        context: int | None = None
        try:
            with scope:
                try:
                    problem = await self._check(profile)
                    if problem is not None:  # cheap if it ran before the drain: cached
                        raise StartFailed(profile.name, problem)
                    await self._check_fits(profile)
                    proc = self._launch(self.config, self._placed(child), self.child_log,
                                        self.slots.argv(profile))
                    assert self._nursery is not None
                    self._nursery.start_soon(self._watch, proc)
                    await proc.wait_ready(timeouts.start, timeouts.health_interval)
                    slots, size = self.slots.restorable(profile)
                    if slots:
                        await self._post_shielded(Phase(
                            f"restoring {profile.name}'s prompt cache, {size / 1e6:.1f} MB",
                            profile.name))
                        with trio.move_on_after(SLOT_TIMEOUT):
                            await self.slots.restore(proc, profile)
                    # What a request really gets (slots split the context): learned
                    # once per load, so discovery need not compute or ask per request.
                    context = await proc.slot_context()
                except StartError as failure:
                    error = failure
            if (error is not None or scope.cancelled_caught) and proc is not None:
                await proc.stop(timeouts.stop)
            await self._post_shielded(StartDone(profile, proc, error, context))
            handed_over = True
        finally:
            # Cancelled from outside (the supervisor itself is going away): the child
            # is nobody else's yet, so it must not outlive this task.
            if not handed_over and proc is not None and proc.alive:
                with trio.CancelScope(shield=True):  # bounded by stop()'s own grace
                    await proc.stop(timeouts.stop)

    async def _run_measure(self, profile: Profile, proc: process.LlamaProcess) -> None:
        """What the ready child allocated, from its buffer lines; remembered in state_dir.

        The lines come before readiness, but the output reader may not have read them
        all yet: look after ``MEASURE_SETTLE``, then every ``MEASURE_SETTLE`` until
        ``MEASURE_WAIT`` (a build that prints none is not waited for beyond that).
        """
        deadline = trio.current_time() + MEASURE_WAIT
        measured: Footprint | None = None
        while measured is None and proc.alive and trio.current_time() < deadline:
            await trio.sleep(MEASURE_SETTLE)
            measured = Footprint.parse(proc.buffer_lines)
        if measured is None:
            return
        found = measured

        def remember() -> None:
            key = definition_key(profile.model, profile.flags, _mtime(profile.model))
            self.footprints.put(profile.name, key, found)

        with trio.move_on_after(SIZE_TIMEOUT):
            await trio.to_thread.run_sync(remember, abandon_on_cancel=True)
        await self._post_shielded(Measured(proc, found))

    async def _run_size(self, profile: Profile) -> None:
        """Size a profile off-loop: measured, else ``memory:``, else the estimate, else
        its whole GPU (so an unsizable model never shares one by accident)."""

        def size() -> tuple[int | None, int | None]:
            key = definition_key(profile.model, profile.flags, _mtime(profile.model))
            found = self.footprints.get(profile.name, key)
            measured = found.gpu_total if found is not None and found.gpu_total else None
            try:
                estimate = estimate_profile(profile)
            except Exception:  # a bug in the estimate must not stop the load
                log.exception("estimating %s failed", profile.name)
                return measured, None
            return measured, estimate.total if estimate.sized else None

        measured: int | None = None
        estimate: int | None = None
        with trio.move_on_after(SIZE_TIMEOUT):
            measured, estimate = await trio.to_thread.run_sync(size, abandon_on_cancel=True)
        budgets = self.budgets()
        whole = max((budgets.get(g, 0) for g in profile.gpu), default=0) or max(
            budgets.values(), default=0)
        if measured is not None:
            footprint, source = measured, "measured"
        elif profile.memory is not None:
            footprint, source = profile.memory, "memory"
        elif estimate is not None:
            footprint, source = estimate, "estimate"
        else:
            footprint, source = whole * max(1, len(profile.gpu)), "gpu"
        await self._post_shielded(Sized(profile, footprint, source, estimate, measured))

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
            await self._post_shielded(Phase(f"saving {profile.name}'s prompt cache",
                                            profile.name))
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

    async def _probe_health(self, child: Child, proc: process.LlamaProcess) -> None:
        """Watch the ready ``proc`` for life until it stops being ``child``'s ready process.

        A child that sent no byte of any answer for ``timeouts.health_check`` is asked
        ``/health`` (each probe bounded by ``timeouts.health_check_timeout``; any answer
        will do); after a miss the next probe follows at once. Bytes of an answer count
        as life too: a child streaming tokens is alive even while its HTTP threads are
        too busy to answer a probe. ``HEALTH_MISSES`` misses in a row report it ``Hung``.
        """
        misses = 0
        while child.proc is proc and child.state is State.READY and proc.alive:
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
            if child.proc is not proc or not proc.alive:
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
        with (trio.CancelScope(shield=True), trio.move_on_after(POST_TIMEOUT),
              contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError)):
            await self._send.send(message)

    async def _stop_now(self) -> None:
        """Last resort when ``run`` ends: no child outlives the supervisor."""
        for child in self._children.values():
            self._revoke(child, "swapd stopped at once, without waiting for requests")
        procs = [c.proc for c in self._children.values() if c.proc is not None and c.proc.alive]
        if self._kill_requested:
            for proc in procs:
                proc.kill_now()
        async with trio.open_nursery() as nursery:
            for proc in procs:  # each bounded by its stop grace, all at once
                nursery.start_soon(proc.stop, self.config.timeouts.stop)


def _ready(child: Child) -> bool:
    return child.state is State.READY


def _is_flag(key: str, name: str) -> bool:
    try:
        return canonical_flag(key) == name
    except ValueError:
        return False


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _spread(measured: Footprint, gpus: Sequence[int]) -> dict[int, int]:
    """A measurement (per CUDA device as the child saw them) as bytes per GPU id."""
    on = measured.on_gpus()
    return {gpu: on.get(f"CUDA{index}", 0) for index, gpu in enumerate(gpus)
            if on.get(f"CUDA{index}", 0)}


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
