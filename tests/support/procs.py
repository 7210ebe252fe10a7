"""Find the processes a test run left behind, through a marker in their environment.

``tests/conftest.py`` puts ``SWAPD_TEST_RUN=<uuid>`` into this process's environment.
Every process spawned from here inherits it (children, grandchildren, a ``setsid``-ed
llama-server alike, unless someone deliberately clears the environment), so scanning
``/proc/*/environ`` for it finds exactly what this test run started, and nothing that
another run or another user owns. Linux only.

It also has the helpers the process tests share: a free port, and
:func:`open_server_process`, which runs a server in its own process group, keeps its
stderr, and kills the whole group when the test is done with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

MARKER_VAR = "SWAPD_TEST_RUN"


def _environ_has(pid_dir: Path, needle: bytes) -> bool:
    try:
        environ = (pid_dir / "environ").read_bytes()
    except OSError:  # gone, a kernel thread, or not ours to read
        return False
    return needle in environ.split(b"\0")


def _cmdline(pid_dir: Path) -> str | None:
    try:
        raw = (pid_dir / "cmdline").read_bytes()
    except OSError:
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def _is_zombie(pid_dir: Path) -> bool:
    try:
        stat = (pid_dir / "stat").read_text()
    except OSError:
        return True  # vanished between listing and reading: as good as gone
    # "pid (comm) S ...": comm may hold spaces and parentheses, so split at the last ')'.
    return stat[stat.rfind(")") + 2 :].startswith(("Z", "X"))


def leftover_processes(marker: str) -> list[tuple[int, str]]:
    """Live processes (not this one) whose environment has ``SWAPD_TEST_RUN=<marker>``.

    Zombies are left out: they hold no port, no memory and no GPU, and reaping them is
    their parent's business (a zombie whose parent is this process is reported by the
    parent's own bookkeeping, not here).
    """
    needle = f"{MARKER_VAR}={marker}".encode()
    me = os.getpid()
    found: list[tuple[int, str]] = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        pid = int(pid_dir.name)
        if pid == me or not _environ_has(pid_dir, needle) or _is_zombie(pid_dir):
            continue
        cmdline = _cmdline(pid_dir)
        if cmdline is None:
            continue
        found.append((pid, cmdline))
    return sorted(found)


def kill_leftovers(marker: str) -> list[tuple[int, str]]:
    """SIGKILL every leftover process of this marker; return what was killed."""
    killed = leftover_processes(marker)
    for pid, _ in killed:
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            os.kill(pid, signal.SIGKILL)
    return killed


# -- running a server process in a test ---------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for flags that refuse port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_taken(port: int) -> bool:
    """Whether something (listening or not) holds ``127.0.0.1:port``."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


class ServerProcess:
    """A child process started by :func:`open_server_process`, and its stderr so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stderr = bytearray()
        self._stderr_grew = trio.Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for data in self.process.stderr:
            self.stderr += data
            self._stderr_grew.set()
            self._stderr_grew = trio.Event()

    async def wait_for_stderr(self, text: str) -> None:
        """Wait until ``text`` has appeared on stderr (put a deadline around this)."""
        while text not in self.stderr_text:
            await self._stderr_grew.wait()

    async def expect_stderr(self, text: str, *, within: float) -> None:
        """:meth:`wait_for_stderr`, failing with the stderr tail after ``within`` seconds."""
        with trio.move_on_after(within):
            await self.wait_for_stderr(text)
            return
        raise AssertionError(
            f"{text!r} did not appear on pid {self.pid}'s stderr within {within} s; "
            f"returncode {self.process.returncode}; stderr tail:\n{self.stderr_text[-3000:]}")

    async def wait_for_line(self, text: str) -> str:
        """The first complete stderr line that contains ``text``, without its newline."""
        while True:
            for line in self.stderr_text.splitlines(keepends=True):
                if text in line and line.endswith("\n"):
                    return line.rstrip("\n")
            await self._stderr_grew.wait()

    async def wait_healthy(self, client: httpx.AsyncClient, base_url: str,
                           interval: float = 0.01) -> None:
        """Poll ``GET /health`` until it answers 200; fail at once if the process exits."""
        while True:
            if self.process.returncode is not None:
                raise AssertionError(
                    f"pid {self.pid} exited with {self.process.returncode} before it was "
                    f"healthy; stderr:\n{self.stderr_text[-2000:]}")
            try:
                response = await client.get(f"{base_url}/health")
            except httpx.TransportError:
                pass
            else:
                if response.status_code == 200:
                    return
            await trio.sleep(interval)


@asynccontextmanager
async def open_server_process(argv: list[str], *, kill_timeout: float = 10.0,
                              ) -> AsyncIterator[ServerProcess]:
    """Run ``argv`` in a new session with stderr captured; on exit, kill its whole group.

    The exit path is shielded and bounded: SIGKILL to the process group (grandchildren
    included), then wait for the direct child to be reaped.
    """
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    server = ServerProcess(process)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._read_stderr)
        try:
            yield server
        finally:
            with trio.move_on_after(kill_timeout, shield=True):
                with contextlib.suppress(ProcessLookupError):  # the group is gone
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            nursery.cancel_scope.cancel()
