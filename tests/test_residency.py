"""Several models at once: the supervisor's per-child machines driven by the planner.

Fake clock and fake processes as in ``test_supervisor.py``; footprints come from the
profiles' ``memory:`` settings so the budgets bind without a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from swapd.config import Config, Profile, parse_config
from swapd.core.child import State
from swapd.core.messages import Evicted, Swapped
from swapd.core.supervisor import Supervisor
from swapd.errors import ModelCrashed, Unavailable, WontFit
from swapd.observe.metrics import Metrics
from tests.support.tiny_gguf import write_header_only
from tests.test_supervisor import FakeLauncher, FakePreflight, FakeProc, start_supervisor, use

GiB = 2**30


def residency_config(tmp_path: Path, *, residency: str = "{mode: budget, reserve: 0}",
                     gpus: str = "[{id: 0, memory: 10GiB}]", ttl: int = 0,
                     profiles: str | None = None) -> Config:
    profiles = profiles or """
  a: {model: a.gguf, memory: 4GiB}
  b: {model: b.gguf, memory: 4GiB}
  c: {model: c.gguf, memory: 4GiB}
  huge: {model: c.gguf, memory: 11GiB}
"""
    text = f"""
state_dir: {tmp_path}
ttl: {ttl}
gpus: {gpus}
residency: {residency}
queue: {{max_waiting: 10, starvation_bound: 10s}}
timeouts: {{queue_wait: 60s, drain: 5s, stop: 2s}}
profiles:{profiles}"""
    write_header_only(*(tmp_path / f"{name}.gguf" for name in "abc"))
    return parse_config(text, base_dir=tmp_path)


def facts(sup: Supervisor, kind: type) -> list[Any]:
    return [e.fact for e in sup.events if isinstance(e.fact, kind)]


def resident(sup: Supervisor) -> list[str]:
    return sorted(c.name for c in sup.children())


async def test_two_models_stay_resident_and_interleaved_requests_cause_no_swap(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=2.0)
    served: list[str] = []
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, residency_config(tmp_path), launcher)
        for name in "abababab":
            async with sup.lease(name) as lease:
                served.append(lease.profile.name)
        assert launcher.names == ["a", "b"]  # each loaded once, never swapped
        assert resident(sup) == ["a", "b"]
        assert sup.stats["swaps"] == 0 and facts(sup, Swapped) == []
        status = sup.status()
        assert [r["name"] for r in status["resident"]] == ["b", "a"]  # most recent first
        assert status["gpus"] == [{"id": 0, "budget": 10 * GiB, "planned": 8 * GiB,
                                   "measured": 0}]
        await sup.shutdown()
    assert served == list("abababab")
    assert all(not p.alive for p in launcher.launched)


async def test_max_models_2_in_count_mode_keeps_two_and_evicts_the_least_recent(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    config = residency_config(tmp_path, residency="{mode: count, max_models: 2}", gpus="[]")
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        await use(sup, "a")
        await use(sup, "b")
        await use(sup, "a")  # b is now the least recently used
        await use(sup, "c")
        assert launcher.names == ["a", "b", "c"]
        assert resident(sup) == ["a", "c"]
        assert facts(sup, Evicted) == [Evicted("b", "room")]
        [swap] = facts(sup, Swapped)
        assert (swap.from_, swap.to) == (("b",), "c")
        await sup.shutdown()


async def test_a_third_model_that_does_not_fit_evicts_the_least_recently_used_idle_one(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, residency_config(tmp_path), launcher)
        await use(sup, "b")
        await use(sup, "a")
        await trio.sleep(5)
        await use(sup, "b")  # a is the least recently used now
        await use(sup, "c")  # 3 x 4 GiB > 10 GiB: one must go
        assert resident(sup) == ["b", "c"]
        assert facts(sup, Evicted) == [Evicted("a", "room")]
        assert sup.stats["swaps"] == 1
        assert sup.history[-1]["from"] == "a" and sup.history[-1]["to"] == "c"
        await sup.shutdown()


async def test_a_busy_model_is_waited_for_then_drained_past_the_starvation_bound(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    profiles = """
  a: {model: a.gguf, memory: 6GiB}
  b: {model: b.gguf, memory: 6GiB}
"""
    config = residency_config(tmp_path, profiles=profiles)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        held = await sup.acquire("a")
        began = trio.current_time()
        got_b: list[float] = []

        async def want_b() -> None:
            await use(sup, "b")
            got_b.append(trio.current_time())

        nursery.start_soon(want_b)
        await trio.sleep(9)
        assert not got_b and sup.profile_state("a") is State.READY
        assert sup.serving("a")  # before the bound: a takes newcomers
        await trio.sleep(2)  # past queue.starvation_bound (10 s): a drains
        assert not sup.serving("a")
        with held.scope:
            await trio.sleep_forever()  # cut at timeouts.drain (5 s)
        assert held.revoked_because is not None and "swapped out for 'b'" in \
            held.revoked_because
        await sup.release(held)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(2)
        assert got_b and got_b[0] - began == pytest.approx(10 + 5 + 1, abs=0.2)
        assert resident(sup) == ["b"]
        await sup.shutdown()


async def test_a_pinned_model_survives_everything_but_shutdown_and_its_own_unload(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    profiles = """
  a: {model: a.gguf, memory: 4GiB, pinned: true}
  b: {model: b.gguf, memory: 5GiB}
  c: {model: c.gguf, memory: 5GiB}
  big: {model: c.gguf, memory: 7GiB}
"""
    config = residency_config(tmp_path, profiles=profiles, ttl=30)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, launcher)
        await trio.sleep(2)
        assert resident(sup) == ["a"]  # loaded at start, nobody asked
        await use(sup, "b")
        await use(sup, "c")  # 4 + 5 + 5 > 10: b goes, never the pinned a
        assert resident(sup) == ["a", "c"]
        assert await sup.unload()  # every model but the pinned
        assert resident(sup) == ["a"]
        await trio.sleep(100)  # far past the TTL
        assert resident(sup) == ["a"]
        with pytest.raises(WontFit, match=r"4096\.0 MiB of it held by pinned models"):
            await sup.acquire("big")  # cannot fit beside the pinned model, ever
        assert await sup.unload("a")  # by name: it goes
        assert resident(sup) == [] and sup.profile_state("a") is State.IDLE
        await use(sup, "a")
        await sup.shutdown()
    assert all(not p.alive for p in launcher.launched)
    assert [f.reason for f in facts(sup, Evicted)] == ["room", "unload", "unload", "shutdown"]


async def test_never_fits_answers_503_model_too_large_and_evicts_nothing(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, residency_config(tmp_path), launcher)
        await use(sup, "a")
        with pytest.raises(WontFit) as caught:
            await sup.acquire("huge")
        assert isinstance(caught.value, Unavailable)  # the fallback chain may serve it
        assert (caught.value.status, caught.value.code) == (503, "model_too_large")
        assert "needs 11264.0 MiB on GPU 0, which has 10240.0 MiB" in str(caught.value)
        assert launcher.names == ["a"] and resident(sup) == ["a"]
        await sup.shutdown()


class OomOnceLauncher(FakeLauncher):
    """``b``'s first start dies with llama-server's CUDA out-of-memory message."""

    def __init__(self) -> None:
        super().__init__(load_time=1.0)
        self.oom = {"b"}

    def __call__(self, config: Config, profile: Profile, log: Any,
                 extra_argv: Any = ()) -> FakeProc:
        fail = 1 if profile.name in self.oom else None
        self.oom.discard(profile.name)
        proc = FakeProc(profile, self.load_time, fail)
        self.launched.append(proc)
        return proc


async def test_out_of_memory_at_load_evicts_idle_models_and_retries_once(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = OomOnceLauncher()
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, residency_config(tmp_path), launcher)
        await use(sup, "a")
        await use(sup, "b")  # fails with an OOM, a is evicted, b starts again and works
        assert launcher.names == ["a", "b", "b"]
        assert resident(sup) == ["b"]
        assert facts(sup, Evicted) == [Evicted("a", "oom")]
        assert [e.data["evicted"] for e in sup.events if e.kind == "oom_retry"] == [["a"]]
        assert sup.stats["starts_failed"] == 0 and sup.circuits() == {}
        # An OOM with nothing idle to evict (b is busy) is a failed start like any other.
        launcher.oom.add("c")
        async with sup.lease("b"):
            with pytest.raises(Unavailable):
                await use(sup, "c")
        assert sup.stats["starts_failed"] == 1 and resident(sup) == ["b"]
        await sup.shutdown()


async def test_a_crash_of_one_resident_model_leaves_the_other_serving(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, residency_config(tmp_path), launcher)
        lease_a = await sup.acquire("a")
        lease_b = await sup.acquire("b")
        launcher.launched[1].exit(139)  # b crashes
        with lease_b.scope:
            await trio.sleep_forever()
        assert "exited with code 139" in str(lease_b.revoked_because)
        assert not lease_a.scope.cancel_called
        assert sup.profile_state("b") is State.FAILED
        assert sup.profile_state("a") is State.READY and sup.serving("a")
        assert isinstance(sup.last_error, ModelCrashed)
        await sup.release(lease_a)
        await sup.release(lease_b)
        await sup.shutdown()


async def test_an_unload_then_a_later_load_is_not_a_swap_in_status_or_metrics(
        tmp_path: Path, autojump_clock: Any) -> None:
    from tests.test_supervisor import make_config
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, make_config(tmp_path), launcher)
        metrics = Metrics(sup)
        nursery.start_soon(metrics.follow_events)
        await use(sup, "a")
        assert await sup.unload()
        await trio.sleep(3600)
        await use(sup, "b")
        await trio.testing.wait_all_tasks_blocked()
        text = metrics.render().decode()
        assert sup.stats["swaps"] == 0 and facts(sup, Swapped) == []
        assert "swapd_swaps_total{" not in text
        assert 'swapd_evictions_total{reason="unload"} 1.0' in text
        await use(sup, "c")  # a real swap: both count it once
        await trio.testing.wait_all_tasks_blocked()
        text = metrics.render().decode()
        assert sup.stats["swaps"] == 1 and len(facts(sup, Swapped)) == 1
        assert 'swapd_swaps_total{result="ok"} 1.0' in text
        assert 'swapd_profile_state{profile="c",state="ready"} 1.0' in text
        await sup.shutdown()


async def test_a_forced_kill_is_a_stop_not_a_crash(tmp_path: Path,
                                                   autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, residency_config(tmp_path), launcher)
        lease = await sup.acquire("a")
        await use(sup, "b")
        sup.kill_now()
        with lease.scope:
            await trio.sleep_forever()
        await trio.sleep(1)
        assert all(p.exit_code == -9 for p in launcher.launched)
        assert sup.stats["crashes"] == 0 and sup.circuits() == {}
        assert resident(sup) == [] and sup.state is State.IDLE
        await sup.release(lease)
        await sup.shutdown()


async def test_try_lease_never_loads_or_queues(tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, residency_config(tmp_path), launcher,
                                     FakePreflight())
        async with sup.try_lease("a") as lease:
            assert lease is None
        assert launcher.names == [] and sup.n_waiting == 0
        await use(sup, "a")
        async with sup.try_lease("alpha" if False else "a") as lease:
            assert lease is not None and lease.profile.name == "a"
            assert sup.n_inflight == 1
        await trio.testing.wait_all_tasks_blocked()
        assert sup.n_inflight == 0
        await sup.shutdown()


async def test_gpu_placement_sets_cuda_visible_devices_and_an_even_tensor_split(
        tmp_path: Path, autojump_clock: Any) -> None:
    seen: dict[str, Profile] = {}

    class Recording(FakeLauncher):
        def __call__(self, config: Config, profile: Profile, log: Any,
                     extra_argv: Any = ()) -> FakeProc:
            seen[profile.name] = profile
            return super().__call__(config, profile, log, extra_argv)

    profiles = """
  a: {model: a.gguf, memory: 4GiB, gpu: 1}
  b: {model: b.gguf, memory: 8GiB, gpu: [0, 1]}
"""
    config = residency_config(tmp_path, profiles=profiles,
                              gpus="[{id: 0, memory: 10GiB}, {id: 1, memory: 10GiB}]")
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, config, Recording())
        await use(sup, "a")
        await use(sup, "b")
        assert seen["a"].env["CUDA_VISIBLE_DEVICES"] == "1"
        assert seen["b"].env["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert seen["b"].flags["tensor-split"] == "1,1"
        assert resident(sup) == ["a", "b"]  # 4 + 4 on GPU 1, 4 on GPU 0
        assert [g["planned"] for g in sup.status()["gpus"]] == [4 * GiB, 8 * GiB]
        await sup.shutdown()


def test_a_fixed_llama_server_port_needs_one_model_at_a_time(tmp_path: Path) -> None:
    from swapd.errors import ConfigError
    with pytest.raises(ConfigError, match="each llama-server needs its own port"):
        parse_config(f"""
state_dir: {tmp_path}
llama_server: {{port: 8081}}
residency: {{mode: count, max_models: 2}}
profiles:
  a: {{model: a.gguf}}
""", base_dir=tmp_path)


async def test_a_pinned_model_that_crashes_comes_back_after_its_backoff(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=1.0)
    profiles = """
  a: {model: a.gguf, memory: 4GiB, pinned: true}
  b: {model: b.gguf, memory: 4GiB}
"""
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, residency_config(tmp_path, profiles=profiles),
                                     launcher)
        await trio.sleep(2)
        launcher.launched[0].exit(139)
        await trio.sleep(0.1)
        assert sup.profile_state("a") is State.FAILED
        await trio.sleep(10)  # restart.backoff, then a load
        assert sup.profile_state("a") is State.READY and launcher.names == ["a", "a"]
        assert sup.n_waiting == 0  # the internal want is nobody's request
        await sup.shutdown()


async def test_budget_mode_with_no_known_gpu_memory_refuses_to_start(
        tmp_path: Path, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from swapd.core import supervisor as module
    from swapd.errors import ConfigError
    monkeypatch.setattr(module, "detect_gpu_memory", lambda: None)  # no nvidia-smi
    config = residency_config(tmp_path, gpus="[]")
    sup = Supervisor(config, launcher=FakeLauncher())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="GPU memory is unknown"):
        await sup.run()


class SlowStopProc(FakeProc):
    async def stop(self, grace: float) -> int | None:
        await trio.sleep(1.0)
        return await super().stop(grace)


class SlowStopLauncher(FakeLauncher):
    def __call__(self, config: Config, profile: Profile, log: Any,
                 extra_argv: Any = ()) -> FakeProc:
        proc = SlowStopProc(profile, self.load_time, self.failing.get(profile.name))
        self.launched.append(proc)
        return proc


async def test_nothing_more_is_evicted_for_a_load_while_its_victims_stop(
        tmp_path: Path, autojump_clock: Any) -> None:
    launcher = SlowStopLauncher(load_time=1.0)
    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, residency_config(tmp_path), launcher)
        await use(sup, "a")
        await use(sup, "b")
        nursery.start_soon(use, sup, "c")
        await trio.sleep(0.5)  # a (least recently used) is stopping for c
        assert sup.profile_state("a") is State.STOPPING
        await use(sup, "b")  # messages while a stops: c must not plan another eviction
        await trio.sleep(3)
        assert resident(sup) == ["b", "c"]
        assert facts(sup, Evicted) == [Evicted("a", "room")]
        await sup.shutdown()


def test_progress_describes_the_waited_for_model_while_several_load() -> None:
    from swapd.http.progress import describe
    status = {"state": "starting", "active": "b", "waiting": {"a": 1, "b": 1},
              "load_elapsed": 1.0, "load_expected": 2.0, "phase": None,
              "resident": [{"name": "b", "state": "starting", "load_elapsed": 1.0,
                            "load_expected": 2.0},
                           {"name": "a", "state": "starting", "load_elapsed": 3.0,
                            "load_expected": 4.0}]}
    assert describe(status, "a") == "loading a: 75% (ready in ~1s)"
    assert describe(status, "b") == "loading b: 50% (ready in ~1s)"


def test_progress_does_not_say_a_stop_is_for_this_model_while_another_loads() -> None:
    """slow (the most recently used) stops while alpha loads, for other requests; beta
    waits behind alpha. The line used to say "stopping slow to load beta"."""
    from swapd.http.progress import describe
    status = {"state": "stopping", "active": "slow", "waiting": {"alpha": 2, "beta": 1},
              "phase": None, "load_elapsed": None, "load_expected": None,
              "resident": [{"name": "slow", "state": "stopping"},
                           {"name": "alpha", "state": "starting", "load_elapsed": 1.0,
                            "load_expected": None}]}
    assert describe(status, "beta") == (
        "queued for beta: alpha is loading for other requests (2 waiting ahead)")
    # with nothing else loading, the stop is the one this request waits for
    status["resident"] = [{"name": "slow", "state": "stopping"}]
    assert describe(status, "beta") == "stopping slow to load beta"


async def test_two_models_that_fit_load_at_the_same_time(tmp_path: Path,
                                                         autojump_clock: Any) -> None:
    launcher = FakeLauncher(load_time=5.0)
    served: dict[str, float] = {}

    async def ask(name: str) -> None:
        await use(sup, name)
        served[name] = trio.current_time()

    async with trio.open_nursery() as nursery:
        sup = await start_supervisor(nursery, residency_config(tmp_path), launcher)
        async with trio.open_nursery() as clients:
            for name in "abab":
                clients.start_soon(ask, name)
        assert served["a"] == pytest.approx(5.0, abs=0.1)  # side by side, not one
        assert served["b"] == pytest.approx(5.0, abs=0.1)  # after the other
        assert sorted(launcher.names) == ["a", "b"]  # each once; trio orders the two freely
        await sup.shutdown()
