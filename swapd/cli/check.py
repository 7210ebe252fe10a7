"""``swapd check``: what would fail at swap time, found at config time (argv, model files,
flag names against the binary's ``--help``, memory estimates and what fits together).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from swapd.config import Config, load_config, missing_model_files
from swapd.config.argv import build_argv
from swapd.config.flags import parse_help_flags, unknown_flags
from swapd.core import planner
from swapd.core.preflight import HELP_TIMEOUT
from swapd.errors import ConfigError
from swapd.estimate import (
    Estimate,
    detect_gpu_memory,
    estimate_profile,
    format_bytes,
    format_report,
    parse_gpu_memory,
)
from swapd.http.auth import load_keys

AUTO_PORT = "<auto>"


def check(config_path: str, *, llama_server: Path | None = None,
          gpu_memory: str | None = None) -> int:
    """``swapd check``: print argv per profile to stdout, problems to stderr."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        _print_problems(error.problems, source=error.source)
        return 1
    problems = missing_model_files(config)
    print(f"config {config_path}: {len(config.profiles)} profile(s), "
          f"{len(config.fallbacks)} fallback(s), listening on "
          f"{config.listen.address}")
    for profile in config.profiles.values():
        aliases = f" (aliases: {', '.join(profile.aliases)})" if profile.aliases else ""
        print(f"\nprofile {profile.name}{aliases}")
        print(f"  {_display_argv(config, profile.name)}")
    if config.fallbacks:
        print()
    for fallback in config.fallbacks:
        print(f"fallback {fallback.name}: {fallback.model} at {fallback.base_url}")

    accepted, note = _accepted_flags(config, llama_server)
    if accepted is None:
        print(f"\n{note}", file=sys.stderr)
    else:
        print(f"\n{note}")
        for profile in config.profiles.values():
            problems += [f"profiles.{profile.name}.flags: {message}"
                         for message in unknown_flags(profile.flags, accepted)]
    try:
        load_keys(config.security)
    except ConfigError as error:
        problems += error.problems
    try:
        problems += _memory_report(config, gpu_memory)
    except ValueError as error:
        problems.append(f"--gpu-memory: {error}")
    if problems:
        _print_problems(problems, source=config_path)
        return 1
    print("\nok")
    return 0


def _memory_report(config: Config, gpu_memory: str | None) -> list[str]:
    """Print each profile's VRAM estimate; a problem for each that will not fit."""
    gpu = (parse_gpu_memory(gpu_memory) if gpu_memory else
           config.memory.gpu or detect_gpu_memory())
    estimates = [estimate_profile(profile) for profile in config.profiles.values()]
    text, _all_fit = format_report(estimates, gpu)
    print(f"\nVRAM estimates{f' for {format_bytes(gpu)} of GPU memory' if gpu else ''}:")
    print(text)
    if gpu is None:
        return []
    print(_together_report(config, estimates, gpu))
    return [f"profiles.{e.name}: estimated {format_bytes(e.total)} does not fit in "
            f"{format_bytes(gpu)} of GPU memory" for e in estimates if e.fits(gpu) is False]


def _together_report(config: Config, estimates: Sequence[Estimate], gpu: int) -> str:
    """Which profiles the residency planner would keep loaded side by side."""
    residency = config.residency
    if residency.mode == "count":
        cap = residency.cap or 1
        if cap == 1:
            return ("\nTogether: one model at a time (residency.mode: count, max_models: 1);"
                    " residency.mode: budget lets memory decide")
        return (f"\nTogether: up to {cap} models at once (residency.max_models), whatever "
                "their size; residency.mode: budget lets memory decide")
    memories = {g.id: g.memory for g in config.gpus} or {0: gpu}
    budgets = {i: max(0, memory - residency.reserve) for i, memory in memories.items()}
    sized = {e.name: config.profiles[e.name].memory or e.total
             for e in estimates if e.sized or config.profiles[e.name].memory}

    def plan(name: str, residents: Sequence[planner.Resident]) -> planner.Plan:
        target = planner.Target(name, sized[name], config.profiles[name].gpu)
        return planner.plan(target, residents, budgets, max_models=residency.cap)

    room = ", ".join(f"GPU {i}: {format_bytes(b)}" for i, b in budgets.items())
    lines = [f"\nTogether (residency.mode: budget; for models: {room}):"]
    for name, size in sized.items():
        alone = plan(name, [])
        if not isinstance(alone, planner.Load):
            lines.append(f"  {name}: does not fit at all")
            continue
        resident = planner.Resident(name, alone.usage)
        beside = [other for other in sized
                  if other != name and _loads_as_is(plan(other, [resident]))]
        lines.append(f"  {name} ({format_bytes(size)}): "
                     + (f"fits beside {', '.join(beside)}" if beside else "fits only alone"))
    return "\n".join(lines)


def _loads_as_is(plan: planner.Plan) -> bool:
    return isinstance(plan, planner.Load) and not plan.evict


def _print_problems(problems: Sequence[str], *, source: str) -> None:
    print(f"{source}: {len(problems)} problem(s):", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def _display_argv(config: Config, name: str) -> str:
    """The profile's argv as a shell-quoted line, ``<auto>`` standing for an auto port."""
    port = config.llama_server.port
    argv = build_argv(config, config.profiles[name], port or 0)
    words = [shlex.quote(word) for word in argv]
    if port is None:
        words[argv.index("--port") + 1] = AUTO_PORT
    return " ".join(words)


def _accepted_flags(config: Config, binary: Path | None) -> tuple[frozenset[str] | None, str]:
    """The flag spellings the llama-server build accepts, and a line saying what was done.

    Runs ``<command> --help`` once (the config's whole command, so wrappers such as
    ``[env, X=1, llama-server]`` work), or ``<binary> --help`` when given. Returns None
    (and why) when there is no binary, or its help could not be read.
    """
    command = list(config.llama_server.command)
    if binary is not None:
        command = [str(binary)]
    found = shutil.which(command[0])
    if found is None:
        spaced = "; a command is one program, not split on spaces: use a list" \
            if " " in command[0] else ""
        return None, (f"llama-server not found; flag names not checked "
                      f"(looked for {command[0]!r}{spaced})")
    try:
        result = subprocess.run(
            [found, *command[1:], "--help"], capture_output=True, text=True,
            errors="replace", timeout=HELP_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"could not run {found} --help ({error}); flag names not checked"
    accepted = parse_help_flags(result.stdout + "\n" + result.stderr)
    if not accepted:
        return None, (f"{found} --help exited with code {result.returncode} and listed no "
                      "flags; flag names not checked")
    return accepted, f"flag names checked against {found} --help ({len(accepted)} spellings)"
