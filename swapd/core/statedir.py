"""swapd's own files in ``state_dir``: who owns the directory, and writes that fail there.

**One swapd per state_dir.** The pidfile, the marker on every child and the reap at
start all assume that whatever a state_dir's records name belongs to the one swapd that
uses it, so a second one on the same directory would stop the first one's model.
``lock_state_dir`` takes an exclusive ``flock`` on ``state_dir/swapd.lock`` before
anything else there is touched, and the daemon holds it for its whole life. The file says
who holds it (pid, where it listens) so that a second swapd can name the first when it
refuses to start. The kernel drops the lock when its holder exits, however it exits
(SIGKILL included), so a stale file never blocks a start; and the file is never removed,
because unlinking a lock file races with the next one to take it. The descriptor is not
inherited by children (close-on-exec): a llama-server left running must not keep the lock.

**A full or read-only disk never stops the serving.** The child's log, the pidfile, the
remembered load times and the saved prompt caches are conveniences. ``WriteErrors``
counts every failed write by what was written (the ``swapd_state_write_errors_total``
metric reads its ``counts``) and warns once per streak of failures, not once per line:
the first failure of a kind is a warning with the path and the cause, a later success
logs that writing works again, and only then would a new failure warn again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from swapd.errors import StateDirBusy

log = logging.getLogger(__name__)

LOCK_FILE = "swapd.lock"

WRITE_KINDS = {
    "log": "the child's log",
    "pidfile": "the child's pidfile",
    "load_times": "the remembered load times",
    "slot_cache": "the saved prompt caches",
    "lock": "the owner record of the state_dir lock",
}
"""What swapd writes into state_dir; the keys are the metric's ``what`` label values."""


class WriteErrors:
    """Failed writes into ``state_dir``, counted by kind; each streak warned about once."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(WRITE_KINDS, 0)
        self._failing: set[str] = set()

    def failed(self, what: str, path: Path, error: OSError) -> None:
        self.counts[what] += 1
        if what in self._failing:
            return
        self._failing.add(what)
        code = errno.errorcode.get(error.errno or 0, "")
        log.warning("cannot write %s to %s: %s%s; swapd keeps serving without it (warned "
                    "once until a write works again; swapd_state_write_errors_total counts "
                    "them)", WRITE_KINDS[what], path, error.strerror or error,
                    f" ({code})" if code else "")

    def succeeded(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.info("writing %s works again", WRITE_KINDS[what])

    def failing(self, what: str) -> bool:
        return what in self._failing


class StateLock:
    """The held lock on a state_dir; ``release`` (or the process's exit) lets it go."""

    def __init__(self, path: Path, fd: int, errors: WriteErrors) -> None:
        self.path = path
        self._fd: int | None = fd
        self._errors = errors

    def describe(self, listen: Sequence[str]) -> None:
        """Record this swapd's pid and where it listens, for a second one's refusal."""
        if self._fd is None:
            return
        record = json.dumps({"pid": os.getpid(), "listen": list(listen)}).encode() + b"\n"
        try:  # written before the truncation: a reader never sees an empty file
            os.pwrite(self._fd, record, 0)
            os.ftruncate(self._fd, len(record))
        except OSError as error:
            self._errors.failed("lock", self.path, error)
        else:
            self._errors.succeeded("lock")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def lock_state_dir(state_dir: Path, listen: Sequence[str], errors: WriteErrors) -> StateLock:
    """Take ``state_dir``'s lock, or raise ``StateDirBusy`` naming the swapd that holds it.

    ``listen`` is where this swapd will listen, if known yet (``StateLock.describe``
    updates it once bound). An ``OSError`` means the lock file cannot be created at all
    (a read-only or full state_dir on a first start): swapd does not run without it.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as error:
        if error.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        try:  # a read-only state_dir with the file from an earlier start: flock works
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            raise error from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        pid = holder.get("pid")
        where = holder.get("listen")
        raise StateDirBusy(
            str(state_dir), pid if isinstance(pid, int) else None,
            ", ".join(map(str, where)) if isinstance(where, list) and where else None,
        ) from None
    except BaseException:
        os.close(fd)
        raise
    lock = StateLock(path, fd, errors)
    lock.describe(listen)
    return lock


def _read_holder(fd: int) -> dict[str, object]:
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(os.pread(fd, 4096, 0))
        if isinstance(record, dict):
            return record
    return {}
