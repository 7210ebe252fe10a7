"""Which models stay loaded: a pure function from a snapshot to a plan.

The supervisor owns the children and every side effect; this module only decides. Given
the model a request wants, what is resident now (footprint per GPU, requests in flight,
last use, pinned), the GPUs' budgets and the model cap, :func:`plan` answers one of:

* :class:`Load` — start the target on these GPUs, after stopping these idle models;
* :class:`Wait` — only busy, starting, stopping or pinned models could make room: wait
  for them (the supervisor decides whether to drain one, e.g. past the starvation bound);
* :class:`Never` — it cannot fit even with every evictable model gone: say so with the
  numbers instead of evicting anything.

Rules (each proved by ``tests/test_planner.py``):

* a plan never puts a GPU over its budget, and never the resident count over the cap;
* it never evicts a pinned model, one with requests in flight or waiting, or one that is
  starting or stopping;
* victims are taken least recently used first, and only as many as needed (the shortest
  LRU prefix that frees enough); among models last used at the same moment, the set with
  the fewest bytes;
* with ``max_models=1`` and no budgets it reproduces one-at-a-time swapping: load when
  nothing is resident, swap out the idle resident model, wait for a busy one.

No I/O, no clock, no trio: everything it needs is in its arguments.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Mapping, Sequence

import attrs

UNLIMITED = 1 << 62
"""A budget that nothing exceeds: ``residency.mode: count`` plans by count alone."""


class Phase(enum.Enum):
    """Where a resident model is in its life, as far as planning cares."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


@attrs.frozen
class Resident:
    """A model that holds (or is about to hold) GPU memory."""

    name: str
    usage: Mapping[int, int]  # bytes per GPU id
    inflight: int = 0
    waiting: int = 0
    last_used: float = 0.0
    pinned: bool = False
    phase: Phase = Phase.READY

    @property
    def evictable(self) -> bool:
        return (self.phase is Phase.READY and not self.pinned and self.inflight == 0
                and self.waiting == 0)


@attrs.frozen
class Target:
    """The model to load: its footprint and where it may go.

    ``gpus`` empty means any one GPU (``gpu: auto``); several ids mean a split across
    all of them (``--tensor-split``), the footprint divided evenly.
    """

    name: str
    footprint: int
    gpus: tuple[int, ...] = ()

    def placements(self, budgets: Mapping[int, int]) -> list[dict[int, int]]:
        """Each way to place it: bytes per GPU."""
        if self.gpus:
            share = -(-self.footprint // len(self.gpus))  # ceiling: never under-count
            return [{gpu: share for gpu in self.gpus}]
        return [{gpu: self.footprint} for gpu in sorted(budgets)]


@attrs.frozen
class Load:
    usage: Mapping[int, int]  # where the target goes: bytes per GPU
    evict: tuple[str, ...] = ()  # stop these first, in this order

    @property
    def gpus(self) -> tuple[int, ...]:
        return tuple(sorted(self.usage))


@attrs.frozen
class Wait:
    blocking: tuple[str, ...]  # the models that would have to go first
    reason: str


@attrs.frozen
class Never:
    reason: str


Plan = Load | Wait | Never


def plan(target: Target, residents: Sequence[Resident], budgets: Mapping[int, int], *,
         max_models: int | None = None) -> Plan:
    """Decide how ``target`` gets loaded; see the module docstring for the rules.

    ``budgets`` maps each GPU id swapd may use to the bytes plans may fill on it (its
    memory less the reserve). ``max_models`` caps how many models are resident at once
    (None: no cap). A resident ``target`` is the caller's business (it is served, not
    planned); it is ignored here.
    """
    others = [r for r in residents if r.name != target.name]
    pinned = [r for r in others if r.pinned]
    if max_models is not None and len(pinned) + 1 > max_models:
        return Never(f"max_models is {max_models} and pinned models hold every place")
    options: list[tuple[tuple[int, int, int], Plan]] = []
    never: list[str] = []
    blocked: set[str] = set()
    for usage in target.placements(budgets):
        if any(gpu not in budgets for gpu in usage):
            missing = sorted(g for g in usage if g not in budgets)
            never.append(f"GPU {', '.join(map(str, missing))} is not in gpus")
            continue
        floor = {gpu: _used(pinned, gpu) for gpu in usage}
        too_big = [gpu for gpu in usage if floor[gpu] + usage[gpu] > budgets[gpu]]
        if too_big:
            gpu = too_big[0]
            never.append(
                f"{target.name} needs {_mib(usage[gpu])} on GPU {gpu}, which has "
                f"{_mib(budgets[gpu])} for models" + (
                    f", {_mib(floor[gpu])} of it held by pinned models" if floor[gpu] else ""))
            continue
        victims = _victims(usage, others, budgets, max_models)
        if victims is None:
            blocked.update(r.name for r in others if not r.evictable
                           and not r.pinned and _touches(r, usage))
            if max_models is not None and len(others) + 1 > max_models:
                blocked.update(r.name for r in others if not r.evictable and not r.pinned)
            continue
        freed = sum(sum(r.usage.values()) for r in victims)
        free_after = min(budgets[g] - _used(others, g) + _freed(victims, g) - usage[g]
                         for g in usage)
        # Fewest victims, then fewest bytes evicted, then the most room left over.
        options.append(((len(victims), freed, -free_after),
                        Load(usage, tuple(r.name for r in victims))))
    if options:
        return min(options, key=lambda option: option[0])[1]
    if blocked:
        names = tuple(sorted(blocked))
        return Wait(names, f"{target.name} must wait for {', '.join(names)} to finish")
    return Never("; ".join(never) or f"no GPU is configured for {target.name}")


def _victims(usage: Mapping[int, int], others: Sequence[Resident], budgets: Mapping[int, int],
             max_models: int | None) -> list[Resident] | None:
    """The shortest LRU prefix of idle models whose eviction makes room, or None."""
    candidates = sorted((r for r in others if r.evictable), key=lambda r: r.last_used)
    chosen: list[Resident] = []
    if _fits(usage, others, chosen, budgets, max_models):
        return chosen
    # Models last used at the same moment form one group: inside the group that completes
    # the fit, take the subset with the fewest bytes (groups are small: ties are rare).
    for _, group_iter in itertools.groupby(candidates, key=lambda r: r.last_used):
        group = list(group_iter)
        for size in range(1, len(group) + 1):
            subsets = sorted(itertools.combinations(group, size),
                             key=lambda s: sum(sum(r.usage.values()) for r in s))
            for subset in subsets:
                if _fits(usage, others, [*chosen, *subset], budgets, max_models):
                    return _prune([*chosen, *subset], usage, others, budgets, max_models)
        chosen.extend(group)
    return None


def _prune(chosen: list[Resident], usage: Mapping[int, int], others: Sequence[Resident],
           budgets: Mapping[int, int], max_models: int | None) -> list[Resident]:
    """Keep the victims on other GPUs that the model cap turned out not to need."""
    for resident in reversed(list(chosen)):
        if not _touches(resident, usage):
            rest = [r for r in chosen if r is not resident]
            if _fits(usage, others, rest, budgets, max_models):
                chosen = rest
    return chosen


def _fits(usage: Mapping[int, int], others: Sequence[Resident], evicted: Sequence[Resident],
          budgets: Mapping[int, int], max_models: int | None) -> bool:
    if max_models is not None and len(others) - len(evicted) + 1 > max_models:
        return False
    return all(_used(others, gpu) - _freed(evicted, gpu) + need <= budgets[gpu]
               for gpu, need in usage.items())


def _used(residents: Iterable[Resident], gpu: int) -> int:
    return sum(r.usage.get(gpu, 0) for r in residents)


def _freed(evicted: Iterable[Resident], gpu: int) -> int:
    return _used(evicted, gpu)


def _touches(resident: Resident, usage: Mapping[int, int]) -> bool:
    return any(resident.usage.get(gpu, 0) for gpu in usage)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
