"""The supervisor's scheduling on trio's fake clock.

The process boundary is faked (``FakeProc`` loads for a set time, can fail or crash), so
queue waits, starvation bounds, drain deadlines and TTLs run in milliseconds. The real
process layer is tested against real children in ``test_process.py``.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from swapd.config import Config, Profile, parse_config
from swapd.core.child import IllegalTransition, State
from swapd.core.supervisor import Supervisor
from swapd.errors import (
    CircuitOpen,
    LocalFailed,
    ModelCrashed,
    ModelHung,
    NoModelLoaded,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    StartFailed,
    Unavailable,
    UnknownModel,
)
from tests.support.tiny_gguf import write_header_only, write_tiny_llama

_pids = itertools.count(1000)


class FakeProc:
    """Stands in for ``process.LlamaProcess`` with fake-clock timings."""

    def __init__(self, profile: Profile, load_time: float, fail_code: int | None) -> None:
        self.name = profile.name
        self.pid = next(_pids)
        self.port = 0
        self.started_at = trio.current_time()
        self.ready_at: float | None = None
        self.exit_code: int | None = None
        self.exited = trio.Event()
        self.tail: deque[str] = deque(["loading", "boom: out of memory"] if fail_code else [])
        self.buffer_lines: list[str] = []
        self.stopped_at: float | None = None
        self.last_heard = trio.current_time()
        self.hung = False  # answers no health probe (a SIGSTOPped or deadlocked child)
        self.probes = 0
        self._load_time = load_time
        self._fail_code = fail_code

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    async def watch(self) -> None:
        await self.exited.wait()

    async def wait_ready(self, start_timeout: float, interval: float) -> None:
        await trio.sleep(self._load_time)
        if self._fail_code is not None:
            self.exit(self._fail_code)
            raise StartFailed(self.name, f"exited with code {self._fail_code} during start",
                              exit_code=self._fail_code, stderr_tail=list(self.tail))
        self.ready_at = self.last_heard = trio.current_time()  # it answered /health

    async def slot_context(self) -> int | None:
        return None  # what the child's /props says one request gets: unknown here

    async def answers_health(self, within: float) -> bool:
        self.probes += 1
        if self.hung:
            await trio.sleep(within)
            return False
        await trio.sleep(0.001)
        self.last_heard = trio.current_time()
        return True

    async def stop(self, grace: float) -> int | None:
        await trio.sleep(0.01)
        self.stopped_at = trio.current_time()
        self.exit(0)
        return 0

    def kill_now(self) -> None:
        self.exit(-9)

    def exit(self, code: int) -> None:
        if self.alive:
            self.exit_code = code
            self.exited.set()


class FakeLauncher:
    def __init__(self, load_time: float = 1.0) -> None:
        self.load_time = load_time
        self.launched: list[FakeProc] = []
        self.failing: dict[str, int] = {}

    def __call__(self, config: Config, profile: Profile, log: Any,
                 extra_argv: Any = ()) -> FakeProc:
        proc = FakeProc(profile, self.load_time, self.failing.get(profile.name))
        self.launched.append(proc)
        return proc

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.launched]


class FakePreflight:
    """Stands in for ``preflight.Preflight``: a verdict per profile, after ``delay``."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.problems: dict[str, str] = {}
        self.checked: list[str] = []

    async def __call__(self, config: Config, profile: Profile) -> str | None:
        self.checked.append(profile.name)
        await trio.sleep(self.delay)
        return self.problems.get(profile.name)


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    queue = overrides.get("queue", "max_waiting: 10\n  starvation_bound: 10s")
    timeouts = overrides.get("timeouts", "queue_wait: 60s\n  drain: 5s\n  stop: 2s")
    text = f"""
state_dir: {tmp_path}
ttl: {overrides.get('ttl', 0)}
queue:
  {queue}
timeouts:
  {timeouts}
profiles:
  a: {{model: a.gguf, aliases: [alpha]}}
  b: {{model: b.gguf}}
  c: {{model: c.gguf}}
"""
    write_header_only(*(tmp_path / f"{name}.gguf" for name in "abc"))  # for a real check
    return parse_config(text, base_dir=tmp_path)


async def start_supervisor(nursery: trio.Nursery, config: Config, launcher: FakeLauncher,
                           preflight: FakePreflight | None = None) -> Supervisor:
    sup = Supervisor(config, launcher=launcher,  # type: ignore[arg-type]
                     preflight=preflight or FakePreflight())
    await nursery.start(sup.run)
    return sup


async def use(sup: Supervisor, name: str | None, hold: float = 0.0,
              log: list[tuple[str, float]] | None = None) -> None:
    async with sup.lease(name) as lease:
        if log is not None:
            log.append((lease.profile.name, trio.current_time()))
        await trio.sleep(hold)


async def test_first_request_loads_the_model(tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=3.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        lease = await sup.acquire("alpha")
        assert lease.profile.name == "a"
        assert sup.state is State.READY
        assert trio.current_time() == pytest.approx(3.0, abs=0.1)
        await sup.release(lease)
        assert sup.load_seconds["a"] == pytest.approx(3.0)
        await sup.shutdown()
    assert launcher.launched[0].stopped_at is not None
    assert (tmp_path / "load_times.json").exists()


async def test_interleaved_burst_loads_each_model_once(tmp_path: Path,
                                                       autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    served: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        async with trio.open_nursery() as clients:
            for name in "abcabcabc":
                clients.start_soon(use, sup, name, 0.5, served)
                await trio.sleep(0.001)
        await sup.shutdown()
    assert launcher.names == ["a", "b", "c"]
    assert [name for name, _ in served] == list("aaabbbccc")


async def test_ready_model_is_served_without_waiting(tmp_path: Path,
                                                     autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        await use(sup, "a")
        before = trio.current_time()
        await use(sup, "a")
        await use(sup, None)  # no model named: the active one
        assert trio.current_time() == before
        assert launcher.names == ["a"]
        await sup.shutdown()


async def test_no_model_and_unknown_model(tmp_path: Path, autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), FakeLauncher())
        with pytest.raises(NoModelLoaded, match="name one of: a, b, c"):
            await sup.acquire(None)
        with pytest.raises(UnknownModel, match="'zz' is not configured"):
            await sup.acquire("zz")
        await sup.shutdown()


async def test_queue_full_is_429_with_retry_after(tmp_path: Path, autojump_clock: Any) -> None:
    config = make_config(tmp_path, queue="max_waiting: 2")
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, FakeLauncher(load_time=5.0))
        async with trio.open_nursery() as clients:
            clients.start_soon(use, sup, "a")
            clients.start_soon(use, sup, "a")
            await trio.testing.wait_all_tasks_blocked()
            assert sup.n_waiting == 2
            with pytest.raises(QueueFull) as caught:
                await sup.acquire("b")
            assert caught.value.status == 429
            assert caught.value.retry_after is not None and caught.value.retry_after >= 1
        await sup.shutdown()


async def test_queue_wait_is_504_and_the_load_goes_on(tmp_path: Path,
                                                      autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=10.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        with pytest.raises(QueueTimeout, match="'b' was not ready within 4s") as caught:
            await sup.acquire("b", queue_wait=4)
        assert caught.value.status == 504
        await trio.testing.wait_all_tasks_blocked()
        assert sup.n_waiting == 0
        await trio.sleep(7)
        assert sup.state is State.READY and sup.active is not None
        assert sup.active.name == "b"
        await sup.shutdown()


async def test_cancelled_waiter_leaves_the_queue(tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=10.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        with trio.move_on_after(2):
            await sup.acquire("a")
        await trio.testing.wait_all_tasks_blocked()
        assert sup.n_waiting == 0
        assert sup.state is State.STARTING
        await trio.sleep(9)
        assert sup.state is State.READY
        assert sup.n_inflight == 0  # nobody holds a lease for the gone client
        await sup.shutdown()


async def test_inflight_request_finishes_before_its_model_stops(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    served: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        await use(sup, "a")
        async with trio.open_nursery() as clients:
            clients.start_soon(use, sup, "a", 3.0, served)  # a long generation on a
            await trio.sleep(0.5)
            clients.start_soon(use, sup, "b", 0.0, served)
        a_proc = launcher.launched[0]
        assert a_proc.stopped_at is not None
        assert a_proc.stopped_at >= served[0][1] + 3.0  # not before the request ended
        assert served[1][0] == "b"
        await sup.shutdown()


async def test_starvation_bound_stops_newcomers_to_a_busy_model(
        tmp_path: Path, autojump_clock: Any) -> None:
    """A steady stream of requests for a cannot hold b off past the bound."""
    config = make_config(tmp_path, queue="max_waiting: 50\n  starvation_bound: 4s")
    launcher = FakeLauncher(load_time=1.0)
    served: list[tuple[str, float]] = []

    async def busy_client(offset: float) -> None:
        await trio.sleep(offset)  # staggered: a always has a request in flight
        while trio.current_time() < 30:
            await use(sup, "a", 1.0, served)
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        await use(sup, "a")
        async with trio.open_nursery() as clients:
            for offset in (0.0, 0.4, 0.8):
                clients.start_soon(busy_client, offset)
            await trio.sleep(1.5)
            asked = trio.current_time()
            clients.start_soon(use, sup, "b", 0.0, served)
        b_served = next(t for name, t in served if name == "b")
        # bound (4 s) + the last a-request's remaining time (<= 1 s) + stop + load (1 s)
        assert b_served - asked <= 4 + 1 + 1 + 0.1
        assert b_served - asked >= 4  # a kept serving its newcomers until the bound
        await sup.shutdown()


async def test_drain_deadline_cuts_a_request_that_never_ends(
        tmp_path: Path, autojump_clock: Any) -> None:
    config = make_config(tmp_path, queue="starvation_bound: 1s",
                         timeouts="drain: 3s\n  queue_wait: 60s")
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        lease = await sup.acquire("a")
        async with trio.open_nursery() as clients:
            clients.start_soon(use, sup, "b")
            with lease.scope:
                await trio.sleep_forever()
        assert lease.scope.cancelled_caught
        assert lease.revoked_because == (
            "model 'a' is being swapped out for 'b' and the request did not finish within "
            "timeouts.drain (3s)")
        await sup.release(lease)
        assert launcher.names == ["a", "b"]
        # bound 1 s + drain 3 s after b asked at t=1, then stop + load
        assert trio.current_time() == pytest.approx(1 + 1 + 3 + 1, abs=0.2)
        await sup.shutdown()


@pytest.mark.parametrize(("cause", "words"), [
    ("shutdown", "swapd is shutting down"),
    ("unload", "model 'a' is being unloaded (swapd unload / POST /swapd/unload)"),
    ("reload", "model 'a' was removed from the config by a reload"),
])
async def test_a_request_cut_at_the_drain_deadline_hears_why(
        tmp_path: Path, autojump_clock: Any, cause: str, words: str) -> None:
    """Not "being swapped out" when nothing is swapped: the cause, in its own words."""
    config = make_config(tmp_path, timeouts="drain: 3s\n  queue_wait: 60s")
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        lease = await sup.acquire("a")
        async with trio.open_nursery() as operator:
            if cause == "shutdown":
                operator.start_soon(sup.shutdown)
            elif cause == "unload":
                operator.start_soon(sup.unload)
            else:
                new = reloaded(tmp_path, "  b: {model: b.gguf}\n")
                operator.start_soon(sup.reload, attrs.evolve(new, timeouts=config.timeouts))
            with lease.scope:
                await trio.sleep_forever()
            await sup.release(lease)
        assert lease.scope.cancelled_caught
        assert lease.revoked_because == (
            f"{words} and the request did not finish within timeouts.drain (3s)")
        assert trio.current_time() == pytest.approx(1 + 3, abs=0.2)
        await sup.shutdown()


async def test_failed_start_answers_its_waiters_with_the_reason(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=0.5)
    launcher.failing["b"] = 137
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        with pytest.raises(Unavailable, match="exited with code 137") as caught:
            await sup.acquire("b")
        assert "out of memory" in str(caught.value)
        assert sup.state is State.FAILED
        status = sup.status()
        assert status["last_error"]["exit_code"] == 137
        assert "boom: out of memory" in status["last_error"]["stderr_tail"]
        await use(sup, "a")  # a working profile still loads after a failure
        assert sup.state is State.READY
        await sup.shutdown()


async def test_crash_while_serving_revokes_leases(tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        lease = await sup.acquire("a")
        launcher.launched[0].exit(139)
        with lease.scope:
            await trio.sleep_forever()
        assert lease.scope.cancelled_caught
        await sup.release(lease)
        assert sup.state is State.FAILED
        assert isinstance(sup.last_error, ModelCrashed)
        assert sup.last_error.exit_code == 139
        await use(sup, "a")  # the next request starts it again
        assert len(launcher.launched) == 2
        await sup.shutdown()


async def test_a_child_that_stops_answering_is_killed_and_restarted(
        tmp_path: Path, autojump_clock: Any) -> None:
    config = make_config(tmp_path, timeouts="queue_wait: 60s\n  health_check: 10s\n"
                                            "  health_check_timeout: 5s")
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        lease = await sup.acquire("a")
        hung = launcher.launched[0]
        ready_at = trio.current_time()
        hung.hung = True  # SIGSTOP: no byte of any answer, no answer to /health
        with lease.scope:
            await trio.sleep_forever()  # a request waiting on it, forever
        # silent for health_check, then HEALTH_MISSES probes of health_check_timeout
        assert trio.current_time() == pytest.approx(ready_at + 10 + 3 * 5, abs=0.1)
        assert lease.revoked_because is not None
        assert "'a' stopped answering its health check" in lease.revoked_because
        await sup.release(lease)
        assert hung.exit_code == -9  # SIGKILLed (a stopped process ignores SIGTERM)
        assert sup.state is State.FAILED
        assert isinstance(sup.last_error, ModelHung)
        assert sup.status()["last_error"]["kind"] == "hung"
        assert sup.stats["hangs"] == 1
        assert sup.circuits()["a"]["failures"] == 1  # counts for backoff and circuit
        assert [e.kind for e in sup.events if e.kind == "hung"] == ["hung"]
        await use(sup, "a")  # the next request starts it again, after the backoff
        assert len(launcher.launched) == 2
        await sup.shutdown()


async def test_a_busy_child_is_not_probed_and_a_slow_probe_is_not_a_hang(
        tmp_path: Path, autojump_clock: Any) -> None:
    config = make_config(tmp_path, timeouts="health_check: 10s\n  health_check_timeout: 5s")
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        await use(sup, "a")
        proc = launcher.launched[0]
        proc.hung = True  # its HTTP threads are all busy: /health gets no answer ...
        for _ in range(20):  # ... but tokens flow to the requests it serves
            await trio.sleep(3)
            proc.last_heard = trio.current_time()
        assert proc.probes == 0  # never silent for health_check: never asked
        await trio.sleep(10 + 5 + 2)  # silent: one probe missed, a second one pending
        assert proc.probes == 2
        proc.last_heard = trio.current_time()  # an answer arrives meanwhile
        # Silent again: probes at +10 and +15 miss; it answers before the third (at +20)
        # would make HEALTH_MISSES (17, not 20: no tie between the test and the probe).
        await trio.sleep(17)
        proc.hung = False
        await trio.sleep(30)
        assert sup.state is State.READY and proc.alive
        assert sup.stats["hangs"] == 0
        await sup.shutdown()


async def test_health_checks_can_be_turned_off(tmp_path: Path, autojump_clock: Any) -> None:
    config = make_config(tmp_path, timeouts="health_check: 0")
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        await use(sup, "a")
        launcher.launched[0].hung = True
        await trio.sleep(3600)
        assert sup.state is State.READY and launcher.launched[0].probes == 0
        await sup.shutdown()


async def test_ttl_unloads_an_idle_model(tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path, ttl="30s"), launcher)
        await use(sup, "a", hold=10)
        await trio.sleep(29)
        assert sup.state is State.READY  # idle time counts from the end of the request
        await trio.sleep(2)
        assert sup.state is State.IDLE
        assert launcher.launched[0].stopped_at == pytest.approx(1 + 10 + 30, abs=0.1)
        await sup.shutdown()


async def test_keep_alive_overrides_the_ttl_until_the_model_stops(
        tmp_path: Path, autojump_clock: Any) -> None:
    """Ollama's ``keep_alive``: 0 unloads once the last request is done (not while one
    still holds the model), a duration replaces the TTL, ``inf`` never unloads, and the
    next load of the model is back on its TTL."""
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path, ttl="30s"), launcher)
        await use(sup, "a")
        await sup.keep_alive("a", math.inf)
        await trio.sleep(300)
        assert sup.profile_state("a") is State.READY and sup.idle_ttl("a") is None
        await use(sup, "a")
        await sup.keep_alive("a", 5.0)  # as Ollama's route does: after the answer
        await trio.sleep(0.01)  # the loop reads it
        assert sup.idle_ttl("a") == 5.0
        await trio.sleep(4)
        assert sup.profile_state("a") is State.READY
        await trio.sleep(2)
        assert sup.profile_state("a") is State.IDLE
        async with trio.open_nursery() as clients:
            clients.start_soon(use, sup, "a", 10.0)
            await trio.sleep(5)
            await sup.keep_alive("a", 0)
            await trio.sleep(1)
            assert sup.profile_state("a") is State.READY  # a request still holds it
        await trio.sleep(0.1)
        assert sup.profile_state("a") is State.IDLE
        second = launcher.launched[1]
        assert second.stopped_at is not None
        assert second.started_at + 10 <= second.stopped_at <= second.started_at + 12
        await use(sup, "a")
        assert sup.idle_ttl("a") == 30.0  # a new child: the TTL again
        await sup.shutdown()


async def test_unload_waits_for_inflight_then_stops(tmp_path: Path,
                                                    autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        async with trio.open_nursery() as clients:
            clients.start_soon(use, sup, "a", 2.0)
            await trio.sleep(1.5)
            await sup.unload()
        assert sup.state is State.IDLE
        assert launcher.launched[0].stopped_at is not None
        assert launcher.launched[0].stopped_at >= 3.0
        await sup.unload()  # unloading nothing is fine
        await sup.shutdown()


async def test_shutdown_answers_waiters_and_stops_the_child(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=5.0)
    errors: list[Exception] = []

    async def waiting_client() -> None:
        try:
            await use(sup, "b")
        except ShuttingDown as error:
            errors.append(error)

    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        await use(sup, "a")
        nursery.start_soon(waiting_client)
        await trio.testing.wait_all_tasks_blocked()
        await sup.shutdown()
    assert len(errors) == 1 and errors[0].status == 503
    assert all(not p.alive for p in launcher.launched)
    with pytest.raises(ShuttingDown):
        await sup.acquire("a")


def test_illegal_transition_raises(tmp_path: Path) -> None:
    sup = Supervisor(make_config(tmp_path))
    with pytest.raises(IllegalTransition, match="IDLE -> READY"):
        sup._transition(State.READY)


async def test_restarts_back_off_after_each_failure(tmp_path: Path,
                                                    autojump_clock: Any) -> None:
    config = make_config(tmp_path, timeouts="queue_wait: 60s\n  stop: 1s")
    launcher = FakeLauncher(load_time=0.1)
    launcher.failing["a"] = 1
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        for _ in range(2):
            with pytest.raises(Unavailable):
                await sup.acquire("a")
        starts = [p.started_at for p in launcher.launched]
        # restart.backoff 1s: the second start waits ~1 s after the first failure
        assert starts[1] - starts[0] == pytest.approx(0.1 + 1.0, abs=0.05)
        with pytest.raises(Unavailable):
            await sup.acquire("a")
        await sup.shutdown()


async def test_circuit_opens_after_max_failures_and_half_opens(
        tmp_path: Path, autojump_clock: Any) -> None:
    config = parse_config(f"""
state_dir: {tmp_path}
restart: {{max_failures: 2, cooldown: 30s, backoff: 1s}}
profiles:
  a: {{model: a.gguf}}
  b: {{model: b.gguf}}
""", base_dir=tmp_path)
    launcher = FakeLauncher(load_time=0.1)
    launcher.failing["b"] = 134
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        await use(sup, "a")
        for _ in range(2):
            with pytest.raises(LocalFailed):
                await sup.acquire("b")
        opened = trio.current_time()
        with pytest.raises(CircuitOpen, match="failed 2 times in a row") as caught:
            await sup.acquire("b")  # at once: no start, no wait
        assert trio.current_time() == opened
        assert caught.value.status == 503 and caught.value.retry_after == pytest.approx(30)
        assert sup.circuits()["b"]["state"] == "open"
        assert len(launcher.launched) == 3  # a, and b twice
        await use(sup, "a")  # other profiles are not affected
        await trio.sleep(30)
        assert sup.circuits()["b"]["state"] == "half_open"
        del launcher.failing["b"]
        await use(sup, "b")  # the half-open trial succeeds and closes the circuit
        assert sup.circuits()["b"]["state"] == "closed"
        await trio.sleep(61)  # restart.stable_after: up that long, its failures are over
        assert "b" not in sup.circuits()
        assert [e.kind for e in sup.events if e.kind.startswith("circuit")] == [
            "circuit_open", "circuit_closed"]
        await sup.shutdown()


async def test_failed_trial_reopens_the_circuit(tmp_path: Path, autojump_clock: Any) -> None:
    config = parse_config(f"""
state_dir: {tmp_path}
restart: {{max_failures: 1, cooldown: 10s}}
profiles: {{a: {{model: a.gguf}}}}
""", base_dir=tmp_path)
    launcher = FakeLauncher(load_time=0.1)
    launcher.failing["a"] = 1
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        with pytest.raises(LocalFailed):
            await sup.acquire("a")
        await trio.sleep(10)
        with pytest.raises(LocalFailed):  # the half-open trial, which fails again
            await sup.acquire("a")
        with pytest.raises(CircuitOpen):
            await sup.acquire("a")
        assert len(launcher.launched) == 2
        await sup.shutdown()


def reloaded(tmp_path: Path, profiles: str) -> Config:
    return parse_config(f"state_dir: {tmp_path}\nprofiles:\n{profiles}", base_dir=tmp_path)


async def test_reload_keeps_an_unchanged_running_model(tmp_path: Path,
                                                       autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        await use(sup, "a")
        summary = await sup.reload(reloaded(tmp_path, """
  a: {model: a.gguf, aliases: [alpha]}
  b: {model: b.gguf, flags: {ctx-size: 999}}
  d: {model: d.gguf}
"""))
        assert summary == {"added": ["d"], "removed": ["c"], "changed": ["b"],
                           "active": "a", "active_kept": True}
        await use(sup, "alpha")
        assert len(launcher.launched) == 1 and sup.state is State.READY
        with pytest.raises(UnknownModel):
            await sup.acquire("c")
        await use(sup, "d")
        await sup.shutdown()


async def test_reload_changed_active_serves_until_the_next_swap(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        await use(sup, "a")
        new = reloaded(tmp_path, "  a: {model: a.gguf, flags: {ctx-size: 512}}\n"
                                 "  b: {model: b.gguf}\n")
        summary = await sup.reload(new)
        assert summary["changed"] == ["a"] and not summary["active_kept"]
        await use(sup, "a")  # still the old process
        assert len(launcher.launched) == 1
        await use(sup, "b")
        await use(sup, "a")  # the next start of a uses the new definition
        assert sup.active is new.profiles["a"]
        assert len(launcher.launched) == 3
        await sup.shutdown()


async def test_reload_removing_the_active_profile_unloads_it_when_idle(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=5.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        lease = await sup.acquire("a")
        failed: list[Exception] = []

        async def wait_for_c() -> None:
            try:
                await use(sup, "c")
            except UnknownModel as error:
                failed.append(error)

        nursery.start_soon(wait_for_c)
        await trio.testing.wait_all_tasks_blocked()
        await sup.reload(reloaded(tmp_path, "  b: {model: b.gguf}\n"))
        await trio.testing.wait_all_tasks_blocked()
        assert len(failed) == 1  # its profile is gone: 404, not a hang
        assert sup.state is State.READY  # a request still holds a
        await sup.release(lease)
        await trio.sleep(1)
        assert sup.state is State.IDLE
        await sup.shutdown()


async def test_history_records_stop_load_and_total(tmp_path: Path,
                                                   autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=2.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        await use(sup, "a")
        await use(sup, "b")
        launcher.failing["c"] = 1
        with pytest.raises(LocalFailed):
            await use(sup, "c")
        first, swap, failed = sup.history
        assert (first["from"], first["to"], first["result"]) == (None, "a", "ok")
        assert first["load_seconds"] == pytest.approx(2.0) and first["stop_seconds"] == 0
        assert (swap["from"], swap["to"]) == ("a", "b")
        assert swap["stop_seconds"] == pytest.approx(0.01, abs=0.005)
        assert swap["total_seconds"] == pytest.approx(swap["stop_seconds"] + 2.0)
        assert (failed["to"], failed["result"]) == ("c", "failed")
        await sup.shutdown()


async def test_memory_guard_refuses_a_start_that_cannot_fit(tmp_path: Path) -> None:
    write_tiny_llama(tmp_path / "a.gguf", n_layers=2, n_embd=64, context_length=4096)
    config = parse_config(f"""
state_dir: {tmp_path}
memory: {{gpu: 1MiB, guard: true}}
profiles:
  a: {{model: a.gguf, flags: {{ctx-size: 4096}}}}
""", base_dir=tmp_path)
    launcher = FakeLauncher(load_time=0.1)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        with pytest.raises(LocalFailed, match=r"does not fit in 1\.0+ MiB of GPU memory "
                                              r"\(memory\.guard\)"):
            await sup.acquire("a")
        assert launcher.launched == []  # nothing was spawned
        await sup.shutdown()


async def test_a_cancelled_supervisor_stops_a_child_that_is_still_starting(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=10.0)
    async with trio.open_nursery() as outer:
        sup = await start_supervisor(outer, make_config(tmp_path), launcher)
        outer.start_soon(use, sup, "a")
        await trio.sleep(1)
        assert sup.state is State.STARTING and sup.proc is None
        outer.cancel_scope.cancel()  # e.g. an error elsewhere, or a forced shutdown
    (proc,) = launcher.launched
    assert not proc.alive and proc.stopped_at is not None


async def test_a_request_cut_by_a_stop_at_once_hears_why(tmp_path: Path,
                                                         autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    lease_box: list[Any] = []

    async def holder(task_status: trio.TaskStatus[None]) -> None:
        lease = await sup.acquire("a")
        lease_box.append(lease)
        task_status.started()
        with lease.scope:
            await trio.sleep_forever()

    async with trio.open_nursery() as clients, trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        await clients.start(holder)
        nursery.cancel_scope.cancel()  # a second stop signal, or an internal error
    (lease,) = lease_box
    assert lease.scope.cancelled_caught
    assert lease.revoked_because == "swapd stopped at once, without waiting for requests"


async def test_nothing_waits_on_a_supervisor_that_has_stopped(tmp_path: Path,
                                                               autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), FakeLauncher())
        await sup.shutdown()  # queued first: the loop exits on it
        with pytest.raises(ShuttingDown):
            await sup.reload(make_config(tmp_path))  # queued behind it, answered on exit
    with pytest.raises(ShuttingDown):
        await sup.reload(make_config(tmp_path))  # after: the channel is closed
    assert await sup.unload() is True


async def crash_on_first_request(sup: Supervisor, name: str) -> None:
    """One request that the child crashes on, as ``--fake-crash-after 1`` does."""
    lease = await sup.acquire(name)
    lease.proc.exit(3)  # type: ignore[attr-defined]
    with lease.scope:
        await trio.sleep_forever()  # revoked: the supervisor saw the crash
    await sup.release(lease)


def crash_config(tmp_path: Path, restart: str) -> Config:
    return parse_config(f"state_dir: {tmp_path}\nrestart: {restart}\n"
                        "profiles: {a: {model: a.gguf}, b: {model: b.gguf}}\n",
                        base_dir=tmp_path)


async def test_a_child_that_crashes_on_its_first_request_opens_the_circuit(
        tmp_path: Path, autojump_clock: Any) -> None:
    config = crash_config(tmp_path, "{max_failures: 3, cooldown: 60s, stable_after: 60s}")
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        for _ in range(3):  # each start succeeds; each child dies on its first request
            await crash_on_first_request(sup, "a")
        with pytest.raises(CircuitOpen, match="failed 3 times in a row"):
            await sup.acquire("a")
        assert len(launcher.launched) == 3
        assert sup.circuits()["a"]["state"] == "open"
        await trio.sleep(60)
        # The half-open trial loads fine and crashes as soon as it serves: that is no
        # recovery, so the circuit opens again at once instead of counting from zero.
        await crash_on_first_request(sup, "a")
        with pytest.raises(CircuitOpen, match="failed 4 times in a row"):
            await sup.acquire("a")
        assert len(launcher.launched) == 4
        assert [e.kind for e in sup.events if e.kind.startswith("circuit")] == [
            "circuit_open", "circuit_closed", "circuit_open"]
        await sup.shutdown()


async def test_a_stable_run_forgets_earlier_failures(tmp_path: Path,
                                                     autojump_clock: Any) -> None:
    config = crash_config(tmp_path, "{max_failures: 2, stable_after: 60s}")
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        await crash_on_first_request(sup, "a")
        await use(sup, "a", hold=30)  # restarted after the backoff; up 30 s: not yet stable
        assert sup.circuits()["a"]["failures"] == 1
        await trio.sleep(31)  # up 61 s now
        assert "a" not in sup.circuits()
        await crash_on_first_request(sup, "a")  # counts from zero again: 1 of 2
        assert sup.circuits()["a"] == {"state": "closed", "failures": 1,
                                       "last_error": "model 'a' exited with code 3 while "
                                                     "serving"}
        await use(sup, "a")  # and restarts after the backoff
        assert len(launcher.launched) == 3
        await sup.shutdown()


async def test_unload_after_a_crash_goes_idle_and_keeps_the_failure_count(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        await crash_on_first_request(sup, "a")
        assert sup.state is State.FAILED
        assert await sup.unload() is True
        assert sup.state is State.IDLE
        # What unload does not touch: the failure record (backoff, circuit) and the
        # last error, which are facts about the profile, not about the process.
        assert sup.circuits()["a"]["failures"] == 1
        assert isinstance(sup.last_error, ModelCrashed)
        await use(sup, "a")  # and the next request starts it as from idle
        assert sup.state is State.READY and len(launcher.launched) == 2
        await sup.shutdown()


async def test_unload_that_does_not_finish_in_time_says_so(tmp_path: Path,
                                                           autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        await use(sup, "a")
        proc = launcher.launched[0]

        async def stop_that_hangs(grace: float) -> int | None:
            await trio.sleep(1000)  # say, a stop stuck in uninterruptible I/O
            proc.exit(0)
            return 0

        proc.stop = stop_that_hangs  # type: ignore[method-assign]
        assert await sup.unload() is False
        assert sup.state is State.STOPPING
        await sup.shutdown()


async def test_reload_removing_a_profile_while_it_starts_stops_it(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=5.0)
    failed: list[Exception] = []

    async def wait_for(name: str) -> None:
        try:
            await use(sup, name)
        except UnknownModel as error:
            failed.append(error)

    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        nursery.start_soon(wait_for, "a")
        await trio.sleep(1)
        assert sup.state is State.STARTING
        await sup.reload(reloaded(tmp_path, "  b: {model: b.gguf}\n"))
        await trio.testing.wait_all_tasks_blocked()
        assert [type(e) for e in failed] == [UnknownModel]  # its waiter: 404, not a hang
        await trio.sleep(10)  # well past its load time
        assert sup.state is State.IDLE and sup.active is None and sup.proc is None
        assert not launcher.launched[0].alive  # not left loaded, hidden from the catalog
        with pytest.raises(NoModelLoaded):  # so nothing serves model-less requests
            await sup.acquire(None)
        await sup.shutdown()


async def test_reload_changing_a_profile_while_it_starts_restarts_it_as_changed(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=5.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        async with trio.open_nursery() as clients:
            clients.start_soon(use, sup, "a")  # waits through the reload
            await trio.sleep(1)
            new = reloaded(tmp_path, "  a: {model: a.gguf, flags: {ctx-size: 512}}\n")
            await sup.reload(new)
            lease = await sup.acquire("a")
        assert lease.profile == new.profiles["a"]  # the new definition, not the old one
        assert len(launcher.launched) == 2 and not launcher.launched[0].alive
        await sup.release(lease)
        await sup.shutdown()


async def test_a_model_less_request_is_not_queued_for_a_removed_profile(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        lease = await sup.acquire("a")
        await sup.reload(reloaded(tmp_path, "  b: {model: b.gguf}\n"))
        assert sup.state is State.READY  # a still holds its request
        with pytest.raises(UnknownModel, match="'a' is not configured"):
            await sup.acquire(None)  # it would mean a, which is going away
        await sup.release(lease)
        await trio.sleep(1)
        assert sup.state is State.IDLE
        await use(sup, "b")  # and the supervisor is still alive to serve the rest
        await sup.shutdown()


BAD_MODEL = ("not started: cannot read b.gguf: No such file or directory (check that the "
             "profile's model path is a readable GGUF file)")


async def test_a_profile_that_cannot_start_leaves_the_running_model_alone(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    preflight = FakePreflight(delay=2.0)  # a slow check (the first --help of a binary)
    preflight.problems["b"] = BAD_MODEL
    refused: list[Exception] = []

    async def ask_for_b() -> None:
        try:
            await use(sup, "b")
        except LocalFailed as error:
            refused.append(error)

    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher, preflight)
        await use(sup, "a")
        (a_proc,) = launcher.launched
        async with trio.open_nursery() as clients:
            clients.start_soon(ask_for_b)
            await trio.sleep(1)  # mid-check: the loop answers, a keeps serving newcomers
            before = trio.current_time()
            await use(sup, "a")
            assert trio.current_time() == before and sup.n_waiting == 1
        (error,) = refused
        assert str(error) == f"profile 'b': {BAD_MODEL}" and error.status == 503
        assert launcher.names == ["a"] and a_proc.alive  # nothing was stopped or started
        assert sup.state is State.READY and sup.proc is a_proc
        assert sup.status()["last_error"]["message"] == f"profile 'b': {BAD_MODEL}"
        assert sup.circuits()["b"]["failures"] == 1  # it counts for b's circuit
        for _ in range(2):  # restart.max_failures (3) refusals open it
            with pytest.raises(LocalFailed):
                await sup.acquire("b")
        with pytest.raises(CircuitOpen):
            await sup.acquire("b")
        assert preflight.checked == ["a", "b", "b", "b"] and a_proc.alive
        await use(sup, "a")
        await sup.shutdown()


async def test_every_start_is_checked_and_a_fixed_profile_starts(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    preflight = FakePreflight()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher, preflight)
        await use(sup, "a")
        await use(sup, "b")
        preflight.problems["a"] = "not started: llama-server does not accept --bogus"
        with pytest.raises(LocalFailed, match="--bogus"):
            await sup.acquire("a")  # checked again at its next start, not remembered
        assert sup.active is not None and sup.active.name == "b"
        del preflight.problems["a"]  # the file or the flags were fixed
        await use(sup, "a")
        assert launcher.names == ["a", "b", "a"]
        # A start from idle checks first; a swap checks before draining (then again,
        # from the cache, as it starts): b, b, and for a the refusal, then a, a.
        assert preflight.checked == ["a", "b", "b", "a", "a", "a"]
        await sup.shutdown()


async def test_from_idle_a_start_that_fails_its_check_spawns_nothing(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    preflight = FakePreflight()
    preflight.problems["b"] = BAD_MODEL
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher, preflight)
        with pytest.raises(LocalFailed, match=r"not started: cannot read b\.gguf"):
            await sup.acquire("b")
        assert launcher.launched == [] and sup.state is State.FAILED
        assert sup.history[-1]["result"] == "failed"
        await sup.shutdown()


async def test_a_child_that_dies_as_it_becomes_ready_is_a_failed_start(
        tmp_path: Path, autojump_clock: Any) -> None:
    class DiesAfterReady(FakeProc):
        async def wait_ready(self, start_timeout: float, interval: float) -> None:
            await super().wait_ready(start_timeout, interval)
            self.exit(-11)  # e.g. while its prompt cache is being restored
            await trio.sleep(0.5)

    class Launcher(FakeLauncher):
        def __call__(self, config: Config, profile: Profile, log: Any,
                     extra_argv: Any = ()) -> FakeProc:
            proc = DiesAfterReady(profile, self.load_time, None)
            self.launched.append(proc)
            return proc

    launcher = Launcher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        with pytest.raises(LocalFailed, match="was killed by SIGSEGV right after it "
                                              "became ready"):
            await sup.acquire("a")  # not a lease on a dead child
        assert sup.state is State.FAILED and sup.proc is None
        assert sup.circuits()["a"]["failures"] == 1
        await sup.shutdown()


async def test_a_drain_whose_reason_left_is_called_off(tmp_path: Path,
                                                       autojump_clock: Any) -> None:
    config = make_config(tmp_path, queue="starvation_bound: 1s",
                         timeouts="drain: 5s\n  queue_wait: 60s")
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        long_request = await sup.acquire("a")
        with pytest.raises(QueueTimeout):
            await sup.acquire("b", queue_wait=2)  # a drains for it after 1 s, then it leaves
        await trio.testing.wait_all_tasks_blocked()
        assert sup.serving("a")  # nobody else waits: a takes newcomers again
        await use(sup, "a")
        await trio.sleep(10)  # past the drain deadline: nothing is cut
        assert not long_request.scope.cancel_called and sup.state is State.READY
        await sup.release(long_request)
        assert launcher.names == ["a"]
        await sup.shutdown()


async def test_a_removed_profile_that_crashes_leaves_no_circuit_behind(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        lease = await sup.acquire("a")
        await sup.reload(reloaded(tmp_path, "  b: {model: b.gguf}\n"))
        launcher.launched[0].exit(139)
        with lease.scope:
            await trio.sleep_forever()
        await sup.release(lease)
        assert sup.state is State.IDLE  # the unload its removal asked for is done
        assert sup.circuits() == {}  # no circuit, no metric for a profile that is gone
        await sup.shutdown()


async def test_a_load_command_loads_without_holding_and_refuses_at_once(
        tmp_path: Path, autojump_clock: Any) -> None:
    """``load`` (llama.cpp's ``POST /models/load``): an internal want, answered before
    the load; asked again while it loads, it wants nothing more; unknown names and a
    stopping supervisor are refused at once."""
    launcher = FakeLauncher(load_time=3.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        assert await sup.load("alpha") is None
        assert trio.current_time() < 1.0  # answered, not waited for
        await trio.sleep(1.0)
        assert sup.profile_state("a") is State.STARTING
        assert await sup.load("a") is None
        await trio.sleep(3.0)
        assert sup.profile_state("a") is State.READY and sup.n_inflight == 0
        assert sup.n_waiting == 0 and launcher.names == ["a"]
        refused = await sup.load("nope")
        assert isinstance(refused, UnknownModel)
        assert await sup.unload("a", wait=False) is False  # asked for, not done yet
        await trio.sleep(3.0)
        assert sup.profile_state("a") is State.IDLE
        await sup.shutdown()
    assert isinstance(await sup.load("b"), ShuttingDown)
