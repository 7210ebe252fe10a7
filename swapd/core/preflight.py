"""What can be known about a profile's start before the running model is stopped for it.

A swap stops the working model first and then starts the next one; if the next one
cannot start at all, the swap only took the working model away. So before the
supervisor drains anything for a profile, it asks :class:`Preflight`:

* **the model file**: it exists, is readable and is a GGUF (its header parses as far as
  :class:`~swapd.estimate.ModelFileError` goes: missing shards included). A header this
  build of swapd cannot fully read (a newer quantization) is not a refusal:
  llama-server is the judge of that. Profiles that download their model (``hf-repo``,
  ``model-url``, ``docker-repo``) are not checked.
* **the flags**: every flag name is one the binary's ``--help`` lists (what
  ``swapd check`` does). If the help cannot be read, the flags are not checked.

Only certain problems refuse a start; anything unknown lets it go ahead. Each check is
cheap after the first: headers are cached per file (size, mtime), the help output per
command and binary (path, size, mtime). File I/O runs in a worker thread and ``--help``
in a child process, each with a deadline, so the event loop never waits on them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import trio

from swapd.config import Config, Profile
from swapd.config.flags import parse_help_flags, sets_flag, unknown_flags
from swapd.estimate import LayoutCache, ModelFileError, ModelLayoutError

log = logging.getLogger(__name__)

HELP_TIMEOUT = 30.0
"""Seconds ``llama-server --help`` may take; it may probe GPU backends before printing
(here and in ``swapd check``)."""

FILE_CHECK_TIMEOUT = 10.0
"""Seconds the model-file check may take (a stalled network mount) before the start goes
ahead unchecked."""

DOWNLOAD_FLAGS = ("hf-repo", "model-url", "docker-repo")
"""Flags with which llama-server fetches the model itself: the file need not exist yet."""

PreflightCheck = Callable[[Config, Profile], Awaitable[str | None]]
"""Why ``profile`` cannot start (one line for people), or None; tests pass a fake."""

_HelpKey = tuple[tuple[str, ...], tuple[tuple[str, str], ...], int, int]


class Preflight:
    """The checks and their caches; one per supervisor, used from its task only."""

    def __init__(self) -> None:
        self._layouts = LayoutCache()
        self._files = trio.CapacityLimiter(1)  # LayoutCache is not thread-safe
        self._help: dict[_HelpKey, frozenset[str] | None] = {}
        self._help_lock = trio.Lock()  # one --help run per binary, however many ask

    async def __call__(self, config: Config, profile: Profile) -> str | None:
        model_problem: str | None = None
        help_key: _HelpKey | None = None
        with trio.move_on_after(FILE_CHECK_TIMEOUT) as timer:
            model_problem, help_key = await trio.to_thread.run_sync(
                self._check_files, config, profile, abandon_on_cancel=True,
                limiter=self._files)
        if timer.cancelled_caught:
            log.warning("checking %s's files took over %gs; starting it unchecked",
                        profile.name, FILE_CHECK_TIMEOUT)
        if model_problem is not None:
            return (f"not started: {model_problem} (check that the profile's model path "
                    "is a readable GGUF file)")
        if help_key is None:
            return None
        accepted = await self._accepted_flags(help_key)
        if accepted is None:
            return None
        problems = unknown_flags(profile.flags, accepted)
        if problems:
            return f"not started: {'; '.join(problems)} (run 'swapd check')"
        return None

    def _check_files(self, config: Config, profile: Profile
                     ) -> tuple[str | None, _HelpKey | None]:
        """In a worker thread: the model's problem, and the key of the binary's help."""
        problem = None
        if not any(sets_flag(profile.flags, flag) for flag in DOWNLOAD_FLAGS):
            try:
                self._layouts.get(profile.model)
            except ModelFileError as error:
                problem = str(error)
            except ModelLayoutError as error:  # readable, just not by swapd: no verdict
                log.debug("%s: %s; leaving it to llama-server", profile.name, error)
        return problem, _help_key(config.llama_server.command, config.llama_server.env)

    async def _accepted_flags(self, key: _HelpKey) -> frozenset[str] | None:
        async with self._help_lock:
            if key not in self._help:
                self._help[key] = await _read_help(key[0], dict(key[1]))
            return self._help[key]


async def _kill_group(process: trio.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # nothing to save: it only prints help


def _help_key(command: Sequence[str], env: Mapping[str, str]) -> _HelpKey | None:
    """The command with its program resolved, the env, and the program's size and mtime:
    a rebuilt binary is asked again. None when the program is not found."""
    found = shutil.which(command[0])
    if found is None:
        return None
    try:
        info = os.stat(found)
    except OSError:
        return None
    return (found, *command[1:]), tuple(sorted(env.items())), info.st_size, info.st_mtime_ns


async def _read_help(command: Sequence[str], env: dict[str, str]) -> frozenset[str] | None:
    """Every flag spelling ``COMMAND --help`` lists, or None (and why, logged) if none."""
    argv = [*command, "--help"]
    try:
        with trio.fail_after(HELP_TIMEOUT):
            # Its own process group, killed whole: a wrapper script's children too.
            result = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False,
                env={**os.environ, **env}, start_new_session=True,
                deliver_cancel=_kill_group)
    except (OSError, trio.TooSlowError) as error:
        why = str(error) or f"no answer within {HELP_TIMEOUT:g}s"
        log.warning("could not run %s --help (%s); flag names are not checked before "
                    "starts", Path(command[0]).name, why)
        return None
    text = (result.stdout + b"\n" + result.stderr).decode(errors="replace")
    accepted = parse_help_flags(text)
    if not accepted:
        log.warning("%s --help exited with code %s and listed no flags; flag names are "
                    "not checked before starts", command[0], result.returncode)
        return None
    log.info("flag names are checked against %s --help (%d spellings)", command[0],
             len(accepted))
    return accepted
