"""Processes the benchmark runs: swapd as a daemon, upstreams spawned by hand, /proc reads.

swapd always runs as its own process (``python -m swapd serve``) so that its CPU time
and its RSS are its own, never the load generator's. Upstreams that the benchmark
spawns itself (the "direct" side of the swap figures) get exactly the argv swapd would
use (``swapd.config.argv.build_argv``), and their exit is awaited on a pidfd, like swapd does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .client import clock, fetch

ROOT = Path(__file__).resolve().parents[1]
FAKE_SERVER = ROOT / "tests" / "support" / "fake_llama_server.py"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_exit(popen: subprocess.Popen[bytes], exit_timeout: float) -> bool:
    """Wait for the child to exit (pidfd, no polling); True if it did in ``exit_timeout``."""
    if popen.poll() is not None:
        return True
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:  # already reaped
        return True
    exited = loop.create_future()
    loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
    try:
        await asyncio.wait_for(exited, exit_timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    popen.wait()
    return True


async def kill(popen: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace``; always reaped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGTERM)
    if not await wait_exit(popen, grace):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        await wait_exit(popen, 5.0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)  # whatever it left in its group


async def wait_health(port: int, health_timeout: float, *, interval: float = 0.001,
                      path: str = "/health") -> float:
    """Poll ``GET path`` until it answers 200; returns the clock() of that answer."""
    deadline = clock() + health_timeout
    while True:
        with contextlib.suppress(Exception):
            answer = await fetch(HOST, port, "GET", path, request_timeout=2.0)
            if answer.status == 200:
                return answer.ended_at
        if clock() > deadline:
            raise TimeoutError(f"{HOST}:{port}{path} not healthy within {health_timeout:g}s")
        await asyncio.sleep(interval)


class Swapd:
    """``python -m swapd serve`` on a config the benchmark wrote; stderr goes to a file."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str,
                 root: Path = ROOT) -> None:
        self.root = root  # the checkout whose swapd runs (python -m swapd from there)
        self.port = free_port()
        self.config = {**config, "listen": f"{HOST}:{self.port}",
                       "state_dir": str(workdir / f"state-{name}")}
        self.path = workdir / f"swapd-{name}.yaml"
        self.path.write_text(json.dumps(self.config, indent=1))  # JSON is YAML
        self.log_path = workdir / f"swapd-{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "swapd", "serve", "--config", str(self.path)],
                cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)

    async def start(self, start_timeout: float = 30.0) -> None:
        """Spawn swapd (log level from ``SWAPD_LOG_LEVEL``, INFO as in production)."""
        self._spawn()
        try:
            await wait_health(self.port, start_timeout, interval=0.02)
        except TimeoutError:
            await self.stop()
            raise RuntimeError(f"swapd did not come up; see {self.log_path}") from None

    async def stop(self) -> None:
        if self.popen is not None:
            await kill(self.popen, grace=15.0)

    async def status(self) -> dict[str, Any]:
        answer = await fetch(HOST, self.port, "GET", "/swapd/status",
                             request_timeout=10.0)
        return answer.json()  # type: ignore[no-any-return]

    async def load(self, model: str, load_timeout: float = 120.0) -> dict[str, Any]:
        body = json.dumps({"model": model}).encode()
        answer = await fetch(HOST, self.port, "POST", "/swapd/load", body,
                             request_timeout=load_timeout)
        if answer.status != 200:
            raise RuntimeError(f"swapd could not load {model}: {answer.body!r}")
        return await self.status()

    async def unload(self) -> None:
        await fetch(HOST, self.port, "POST", "/swapd/unload", b"{}", request_timeout=60.0)


def spawn(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """An upstream started by the benchmark itself, in its own process group."""
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


READY_HINTS = (b"model loaded", b"listening on")


class Watched:
    """An upstream whose output is read (and dropped) as it comes, to see its readiness
    lines: the same signal swapd uses, so the direct baseline detects readiness as early
    as swapd can, without polling the loading child hard."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        assert self.popen.stdout is not None
        self._fd = self.popen.stdout.fileno()
        os.set_blocking(self._fd, False)
        self.hinted = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_reader()
        elif any(hint in data for hint in READY_HINTS):
            self.hinted.set()

    def _close_reader(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._fd)

    async def wait_ready(self, port: int, health_timeout: float,
                         interval: float = 0.02) -> float:
        """``/health`` polled every ``interval``, and every millisecond after a readiness
        line; returns the clock() of the first 200."""
        deadline = clock() + health_timeout
        while True:
            with contextlib.suppress(Exception):
                answer = await fetch(HOST, port, "GET", "/health", request_timeout=2.0)
                if answer.status == 200:
                    return answer.ended_at
            if clock() > deadline:
                raise TimeoutError(f"{HOST}:{port}/health not 200 within {health_timeout:g}s")
            if self.hinted.is_set():
                await asyncio.sleep(0.001)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.hinted.wait(), interval)

    async def kill(self) -> None:
        try:
            await kill(self.popen)
        finally:
            self._close_reader()
            assert self.popen.stdout is not None
            self.popen.stdout.close()


def llama_server_version(binary: Path | None) -> str | None:
    if binary is None:
        return None
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines()
             if line.strip().startswith(("version", "built with"))]
    return "; ".join(lines) or None


def load_average() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


MARKER = "SWAPD_BENCH_RUN"
"""Set in this process's environment; every process the run starts inherits it."""


class OtherLoad:
    """Samples, once a second, the CPU that processes *not* started by this run use.

    The benchmark shares its two cores with whatever else runs on the machine (other
    test sessions, say); their CPU time shows up here so a reader can tell a quiet run
    from a disturbed one. A process is ours if its environment has ``MARKER``.
    """

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (clock(), cores used by others)
        self._ours: dict[int, bool] = {}
        self._last: dict[int, int] = {}
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._marker = f"{MARKER}={os.environ[MARKER]}".encode()

    def _is_ours(self, pid: int) -> bool:
        if pid not in self._ours:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                environ = b""
            self._ours[pid] = pid == os.getpid() or self._marker in environ.split(b"\0")
        return self._ours[pid]

    def _scan(self) -> dict[int, int]:
        ticks: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            ticks[pid] = int(fields[11]) + int(fields[12])
        return ticks

    async def run(self, interval: float = 1.0) -> None:
        self._last = self._scan()
        t_last = clock()
        while True:
            await asyncio.sleep(interval)
            now_ticks, now = self._scan(), clock()
            used = sum(t - self._last[pid] for pid, t in now_ticks.items()
                       if pid in self._last and not self._is_ours(pid))
            self.samples.append((now, used / self._ticks / (now - t_last)))
            self._last, t_last = now_ticks, now

    def between(self, t0: float, t1: float) -> float | None:
        """Mean cores used by others in samples taken between ``t0`` and ``t1``."""
        values = [v for t, v in self.samples if t0 <= t <= t1 + 1.0]
        return sum(values) / len(values) if values else None


def source_state(root: Path = ROOT) -> dict[str, Any]:
    """Which swapd was measured: the commit, and a digest of uncommitted changes."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    diff = git("diff", "HEAD", "--", "swapd")
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "swapd_uncommitted": bool(diff),
            "swapd_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}


def machine_info(binary: Path | None) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    versions = {}
    for package in ("swapd", "trio", "hypercorn", "httpx", "httpcore", "h11", "quart",
                    "quart-trio", "attrs", "cattrs", "PyYAML"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "llama_server": str(binary) if binary else None,
        "llama_server_build": llama_server_version(binary),
        "load_average_at_start": load_average(),
        "source": source_state(),
    }
