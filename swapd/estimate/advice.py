"""What to change when a profile does not fit (a smaller context, a lighter cache, fewer
layers on the GPU), and the report ``swapd check`` prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from swapd.config.flags import FlagValue, canonical_flag
from swapd.estimate.gguf import _TYPES_BY_NAME
from swapd.estimate.memory import RUNTIME_RESERVE, Estimate, _estimate, format_bytes

if TYPE_CHECKING:
    pass



# --- fits, fixes, reports --------------------------------------------------------------


@attrs.frozen
class Fix:
    """Flag changes that make a profile fit, each option with its estimate."""

    options: tuple[tuple[Mapping[str, FlagValue], Estimate], ...]
    text: str

    def __str__(self) -> str:
        return self.text


def suggest_fix(estimate: Estimate, gpu_memory: int) -> Fix | None:
    """Up to three ways to bring ``estimate`` under ``gpu_memory``: a quantized KV cache
    at the same context, a smaller context, both, or (when the weights alone are too
    big) fewer GPU layers. None when it fits or cannot be sized."""
    if not estimate.sized or estimate.layout is None or estimate.total <= gpu_memory:
        return None
    layout, flags = estimate.layout, dict(estimate.flags)
    reserve = estimate.runtime or RUNTIME_RESERVE

    def with_changes(changes: Mapping[str, FlagValue]) -> Estimate:
        return _estimate(layout, _merge(flags, changes), estimate.name, reserve)

    options: list[tuple[Mapping[str, FlagValue], Estimate]] = []
    # a quantized V cache needs flash attention; "auto" turns it on, "off" must change
    needs_fa: dict[str, FlagValue] = {} if estimate.flash_attn else {"flash-attn": "on"}
    cache_steps: list[dict[str, FlagValue]] = []
    for cache in ("q8_0", "q4_0"):
        step: dict[str, FlagValue] = {
            f"cache-type-{part}": cache for part, current in (
                ("k", estimate.cache_type_k), ("v", estimate.cache_type_v))
            if _cache_bits(cache) < _cache_bits(current)}
        if any(key == "cache-type-v" for key in step):
            step.update(needs_fa)
        if step:
            cache_steps.append(step)
    for changes in cache_steps:
        candidate = with_changes(changes)
        if candidate.sized and candidate.total <= gpu_memory:
            options.append((changes, candidate))
            break
    smaller = _largest_ctx(with_changes, {}, estimate.ctx_size, gpu_memory)
    if smaller is not None:
        options.append(smaller)
    if not options and cache_steps:
        both = _largest_ctx(with_changes, cache_steps[0], estimate.ctx_size, gpu_memory)
        if both is not None:
            options.append(both)
    if not options:
        layers = _most_layers(with_changes, estimate.n_layers, gpu_memory)
        if layers is not None:
            options.append(layers)
    if not options:
        return Fix((), f"nothing swapd tries fits in {format_bytes(gpu_memory)} (the weights "
                       f"alone need {format_bytes(estimate.weights)} on the GPU, the runtime "
                       f"{format_bytes(reserve)}); use a smaller quantization or a bigger GPU")
    texts = [f"{_show_changes(changes)} -> {format_bytes(e.total)}"
             + (" (the other layers run on the CPU, slower)" if "n-gpu-layers" in changes
                else "")
             for changes, e in options]
    return Fix(tuple(options), " or ".join(texts))


def _merge(flags: Mapping[str, FlagValue], changes: Mapping[str, FlagValue]) -> dict[
        str, FlagValue]:
    """``flags`` with ``changes`` applied, replacing any spelling of the same flag."""
    changed = {canonical_flag(key) for key in changes}
    kept: dict[str, FlagValue] = {}
    for key, value in flags.items():
        try:
            name = canonical_flag(key)
        except ValueError:
            name = key
        if name == "gpu-layers":
            name = "n-gpu-layers"
        if name not in changed:
            kept[key] = value
    return {**kept, **changes}


def _cache_bits(name: str) -> float:
    t = _TYPES_BY_NAME[name]
    return t.type_size * 8 / t.block_size


def _largest_ctx(with_changes: Any, base: Mapping[str, FlagValue], ctx: int,
                 gpu_memory: int) -> tuple[Mapping[str, FlagValue], Estimate] | None:
    """The largest context (a multiple of 1024, at least 2048) that fits, or None."""
    step = 1024
    return _largest_fitting(
        2, ctx // step - (1 if ctx % step == 0 else 0),
        lambda n: {**base, "ctx-size": n * step}, with_changes, gpu_memory)


def _most_layers(with_changes: Any, n_layers: int,
                 gpu_memory: int) -> tuple[Mapping[str, FlagValue], Estimate] | None:
    return _largest_fitting(1, n_layers, lambda n: {"n-gpu-layers": n}, with_changes,
                            gpu_memory)


def _largest_fitting(low: int, high: int, changes_for: Any, with_changes: Any,
                     gpu_memory: int) -> tuple[Mapping[str, FlagValue], Estimate] | None:
    """Binary search for the largest n in [low, high] whose changes fit (estimates grow
    with n), with those changes and their estimate; None if even ``low`` does not fit."""
    best: tuple[Mapping[str, FlagValue], Estimate] | None = None
    while low <= high:
        middle = (low + high) // 2
        changes: dict[str, FlagValue] = changes_for(middle)
        candidate = with_changes(changes)
        if candidate.sized and candidate.total <= gpu_memory:
            best, low = (changes, candidate), middle + 1
        else:
            high = middle - 1
    return best


def _show_changes(changes: Mapping[str, FlagValue]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in changes.items())


def format_report(estimates: Iterable[Estimate],
                  gpu_memory: int | None = None) -> tuple[str, bool]:
    """A few lines per profile, and whether every sized profile fits in ``gpu_memory``
    (True without a budget; profiles that cannot be sized never count as not fitting)::

        qwen: 62/62 layers on GPU, ctx 65536 (q8_0/f16 cache)
          weights 15.42 GiB + KV 4.25 GiB + compute 612.0 MiB + runtime 512.0 MiB = 20.78 GiB
          fits in 24.00 GiB, 3.22 GiB to spare
    """
    lines: list[str] = []
    all_fit = True
    for e in estimates:
        if e.problem is not None and e.weights_total == 0:
            lines += [f"{e.name}: cannot estimate: {e.problem}"]
            continue
        if e.problem is not None:
            lines += [f"{e.name}: cannot estimate: {e.problem}",
                      f"  weights alone: {format_bytes(e.weights)} on the GPU"
                      + (f", {format_bytes(e.host_weights)} in system memory"
                         if e.host_weights else "")]
            continue
        layers = f"{e.gpu_layers}/{e.n_layers} layers on GPU"
        lines.append(f"{e.name}: {layers}, ctx {e.ctx_size} "
                     f"({e.cache_type_k}/{e.cache_type_v} cache"
                     + ("" if e.flash_attn else ", no flash-attn") + ")")
        lines.append(f"  weights {format_bytes(e.weights)} + KV {format_bytes(e.kv_cache)} + "
                     f"compute {format_bytes(e.compute)} + runtime {format_bytes(e.runtime)}"
                     f" = {format_bytes(e.total)}")
        if e.host_weights or e.host_kv:
            lines.append(f"  in system memory: weights {format_bytes(e.host_weights)}"
                         + (f" + KV {format_bytes(e.host_kv)}" if e.host_kv else ""))
        if gpu_memory is not None:
            if e.total <= gpu_memory:
                lines.append(f"  fits in {format_bytes(gpu_memory)}, "
                             f"{format_bytes(gpu_memory - e.total)} to spare")
            else:
                all_fit = False
                lines.append(f"  does NOT fit in {format_bytes(gpu_memory)}: "
                             f"{format_bytes(e.total - gpu_memory)} over")
                fix = suggest_fix(e, gpu_memory)
                if fix is not None:
                    lines.append(f"  fix: {fix.text}")
        lines += [f"  note: {note}" for note in e.notes]
    return "\n".join(lines), all_fit
