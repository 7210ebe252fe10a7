"""The residency planner: worked examples, then properties over generated snapshots.

The planner is a pure function, so these tests need no process, no clock and no trio.
The properties are the rules in ``swapd/core/planner.py``'s docstring; each is checked
against a brute force over every subset of the resident models.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from swapd.core.planner import UNLIMITED, Load, Never, Phase, Resident, Target, Wait, plan

GiB = 2**30


def resident(name: str, gib: float, *, gpu: int = 0, used: float = 0.0, inflight: int = 0,
             pinned: bool = False, phase: Phase = Phase.READY) -> Resident:
    return Resident(name, {gpu: int(gib * GiB)}, inflight=inflight, last_used=used,
                    pinned=pinned, phase=phase)


# -- worked examples (docs/residency.md walks through the first one) --------------------

def test_embedding_model_loads_beside_the_chat_model() -> None:
    chat = resident("qwen-27b", 17.5, used=10)
    result = plan(Target("qwen3-embed", int(0.9 * GiB)), [chat], {0: 23 * GiB})
    assert result == Load({0: int(0.9 * GiB)}, evict=())


def test_a_model_that_does_not_fit_evicts_the_least_recently_used_idle_one() -> None:
    chat = resident("chat", 12, used=30)
    embed = resident("embed", 1, used=10)
    coder = resident("coder", 8, used=20)
    result = plan(Target("big", 10 * GiB), [chat, embed, coder], {0: 23 * GiB})
    # embed (oldest) frees 1 GiB: not enough; coder next frees 8: 2 + 9 = 11 >= 10.
    assert result == Load({0: 10 * GiB}, evict=("embed", "coder"))


def test_busy_models_are_waited_for_never_evicted() -> None:
    chat = resident("chat", 20, inflight=2)
    result = plan(Target("other", 8 * GiB), [chat], {0: 23 * GiB})
    assert isinstance(result, Wait)
    assert result.blocking == ("chat",)


def test_pinned_models_are_never_evicted_and_a_model_that_cannot_fit_says_so() -> None:
    pinned = resident("embed", 2, pinned=True)
    result = plan(Target("huge", 22 * GiB), [pinned], {0: 23 * GiB})
    assert isinstance(result, Never)
    assert "22.0 GiB" not in result.reason  # numbers are in MiB, one unit everywhere
    assert "22528.0 MiB" in result.reason and "pinned" in result.reason


def test_auto_placement_picks_the_gpu_that_needs_no_eviction() -> None:
    on_0 = resident("a", 20, gpu=0)
    result = plan(Target("b", 10 * GiB), [on_0], {0: 23 * GiB, 1: 23 * GiB})
    assert result == Load({1: 10 * GiB}, evict=())


def test_a_split_model_needs_room_on_every_gpu_it_spans() -> None:
    on_1 = resident("a", 20, gpu=1, used=5)
    result = plan(Target("big", 30 * GiB, gpus=(0, 1)), [on_1], {0: 23 * GiB, 1: 23 * GiB})
    assert result == Load({0: 15 * GiB, 1: 15 * GiB}, evict=("a",))


def test_one_at_a_time_is_max_models_one() -> None:
    unlimited = {0: UNLIMITED}
    assert plan(Target("b", 0), [], unlimited, max_models=1) == Load({0: 0})
    idle = resident("a", 0)
    assert plan(Target("b", 0), [idle], unlimited, max_models=1) == Load({0: 0}, ("a",))
    for busy in (resident("a", 0, inflight=1), resident("a", 0, phase=Phase.STARTING),
                 resident("a", 0, phase=Phase.STOPPING)):
        assert plan(Target("b", 0), [busy], unlimited, max_models=1) == Wait(
            ("a",), "b must wait for a to finish")


def test_the_model_cap_evicts_by_count_even_when_memory_is_plenty() -> None:
    a, b = resident("a", 1, used=1), resident("b", 1, used=2)
    result = plan(Target("c", GiB), [a, b], {0: 80 * GiB}, max_models=2)
    assert result == Load({0: GiB}, ("a",))


# -- properties --------------------------------------------------------------------------

GPUS = (0, 1)

residents_strategy = st.lists(
    st.builds(
        Resident,
        name=st.sampled_from("abcdefg"),
        usage=st.dictionaries(st.sampled_from(GPUS), st.integers(1, 12), min_size=1,
                              max_size=2),
        inflight=st.sampled_from([0, 0, 0, 1]),
        waiting=st.sampled_from([0, 0, 0, 1]),
        last_used=st.integers(0, 4).map(float),  # few values: ties happen
        pinned=st.sampled_from([False, False, False, True]),
        phase=st.sampled_from([Phase.READY, Phase.READY, Phase.READY, Phase.STARTING,
                               Phase.STOPPING]),
    ),
    max_size=6, unique_by=lambda r: r.name)

target_strategy = st.builds(
    Target, name=st.just("t"), footprint=st.integers(1, 24),
    gpus=st.sampled_from([(), (), (0,), (1,), (0, 1)]))

budget_strategy = st.fixed_dictionaries({0: st.integers(8, 24), 1: st.integers(8, 24)})


def used_on(residents: Sequence[Resident], gpu: int) -> int:
    return sum(r.usage.get(gpu, 0) for r in residents)


def fits(target_usage: Mapping[int, int], staying: Sequence[Resident],
         budgets: Mapping[int, int], max_models: int | None) -> bool:
    if max_models is not None and len(staying) + 1 > max_models:
        return False
    return all(used_on(staying, g) + n <= budgets[g] for g, n in target_usage.items())


def any_eviction_fits(target: Target, others: Sequence[Resident], budgets: Mapping[int, int],
                      max_models: int | None, allowed: Sequence[Resident]) -> bool:
    for usage in target.placements(budgets):
        for size in range(len(allowed) + 1):
            for gone in itertools.combinations(allowed, size):
                staying = [r for r in others if r not in gone]
                if fits(usage, staying, budgets, max_models):
                    return True
    return False


@settings(max_examples=150, deadline=None, derandomize=True)
@given(target_strategy, residents_strategy, budget_strategy,
       st.sampled_from([None, 1, 2, 3]))
def test_plans_keep_every_rule(target: Target, residents: list[Resident],
                               budgets: dict[int, int], max_models: int | None) -> None:
    others = [r for r in residents if r.name != target.name]
    evictable = [r for r in others if r.evictable]
    result = plan(target, residents, budgets, max_models=max_models)

    if isinstance(result, Load):
        victims = [r for r in others if r.name in result.evict]
        assert len(victims) == len(result.evict)
        # Never a pinned, busy, starting or stopping model.
        assert all(r.evictable for r in victims)
        # Never over a budget or the cap.
        staying = [r for r in others if r not in victims]
        assert fits(result.usage, staying, budgets, max_models)
        assert result.usage in target.placements(budgets)
        # Least recently used first: nobody kept on these GPUs is older than a victim.
        touching = [r for r in victims if any(r.usage.get(g) for g in result.usage)]
        kept = [r for r in evictable if r not in victims
                and any(r.usage.get(g) for g in result.usage)]
        if touching and kept:
            assert max(r.last_used for r in touching) <= min(r.last_used for r in kept)
        # Nothing evicted when nothing had to be.
        if fits(result.usage, others, budgets, max_models):
            assert result.evict == ()
    elif isinstance(result, Wait):
        # Waiting is right only when no eviction of idle models would do, but evicting
        # the non-pinned ones would.
        assert not any_eviction_fits(target, others, budgets, max_models, evictable)
        unpinned = [r for r in others if not r.pinned]
        assert any_eviction_fits(target, others, budgets, max_models, unpinned)
        assert result.blocking
        assert all(not r.evictable and not r.pinned for r in others
                   if r.name in result.blocking)
    else:
        assert isinstance(result, Never)
        unpinned = [r for r in others if not r.pinned]
        assert not any_eviction_fits(target, others, budgets, max_models, unpinned)
        assert result.reason


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=6), st.integers(1, 30),
       st.integers(10, 40))
def test_among_models_used_at_the_same_moment_the_fewest_bytes_go(
        sizes: list[int], need: int, budget: int) -> None:
    residents = [Resident(f"m{i}", {0: size}, last_used=1.0) for i, size in enumerate(sizes)]
    result = plan(Target("t", need), residents, {0: budget})
    if not isinstance(result, Load):
        return
    # The fewest models, and among sets of that many, the fewest bytes.
    best: tuple[int, int] | None = None
    for size in range(len(residents) + 1):
        for gone in itertools.combinations(residents, size):
            staying = [r for r in residents if r not in gone]
            if fits({0: need}, staying, {0: budget}, None):
                candidate = (size, sum(used_on(gone, 0) for _ in [0]))
                best = candidate if best is None or candidate < best else best
    assert best is not None
    evicted = [r for r in residents if r.name in result.evict]
    assert (len(evicted), used_on(evicted, 0)) == best


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.one_of(st.none(), st.builds(
    Resident, name=st.just("a"), usage=st.just({0: 0}), inflight=st.integers(0, 2),
    waiting=st.integers(0, 1), last_used=st.just(0.0), pinned=st.booleans(),
    phase=st.sampled_from(list(Phase)))))
def test_max_models_one_is_todays_one_at_a_time(current: Resident | None) -> None:
    result = plan(Target("b", 0), [current] if current else [], {0: UNLIMITED}, max_models=1)
    if current is None:
        assert result == Load({0: 0})
    elif current.pinned:
        assert isinstance(result, Never)
    elif current.evictable:
        assert result == Load({0: 0}, ("a",))
    else:
        assert result == Wait(("a",), "b must wait for a to finish")
