"""One llama-server child: spawn it, watch its output, know when it is ready, stop it.

The child runs in its own session (so its process group is its own) and gets SIGKILL
from the kernel when swapd dies, even by SIGKILL (``PR_SET_PDEATHSIG``). The death signal
is tied to the *thread* that forked, which is why the child is spawned from the trio
thread here and not with ``trio.lowlevel.open_process`` (that forks in a worker thread
that trio retires after a few idle seconds, which would kill the model with it). Its exit
is awaited on a pidfd, so nothing polls.

``start_llama`` returns only once ``/health`` answered 200: the stderr "listening" line
only hints that a poll is worth making now, the poll is the truth. Every wait has a
deadline and ``LlamaProcess.stop`` never returns with the process group alive.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import re
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import httpx
import trio

from .config import Config, Profile
from .errors import StartFailed, StartTimeout
from .flags import build_argv
from .upstream import ChildPool, UpstreamError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

READY_HINTS = (b"model loaded", b"listening on", b"server is listening")
"""Substrings of llama-server's stderr that make a /health poll worth doing at once."""

PROMPT_TIMING = re.compile(rb"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
"""llama-server's per-request timing line; swapd learns each model's prompt speed from it."""

TAIL_LINES = 40
"""Lines of the child's own output kept for error messages (exit code + stderr tail)."""


class ChildLog:
    """Output of every child swapd ran: recent lines in memory, all of them in a file.

    The file lives in ``state_dir`` and is rotated to ``<name>.1`` when it passes
    ``max_bytes``, so a chatty model can never fill the disk. Writes are plain buffered
    writes flushed once per read from the pipe: the kernel's page cache absorbs them.
    """

    def __init__(self, path: Path | None, *, max_bytes: int, tail_lines: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.lines: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.written = 0
        """Lines written so far; readers of ``lines`` use it to find what is new."""
        self._changed = trio.Event()
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "ab")  # noqa: SIM115 - closed in close()

    def write(self, lines: Sequence[str]) -> None:
        self.lines.extend(lines)
        self.written += len(lines)
        if self._file is not None:
            self._file.write("".join(line + "\n" for line in lines).encode())
            self._file.flush()
            if self._file.tell() > self.max_bytes:
                self._rotate()
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _rotate(self) -> None:
        assert self._file is not None and self.path is not None
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


_DIAGNOSES = (  # most specific first: an OOM also ends in "failed to load model"
    (("out of memory", "cudaMalloc failed", "failed to allocate", "ErrorOutOfDeviceMemory"),
     "not enough (GPU) memory: lower ctx-size, offload fewer layers (n-gpu-layers) or use "
     "a smaller cache-type-k/v"),
    (("couldn't bind", "ddress already in use"),
     "the port is taken: stop what holds it or use llama_server.port: auto"),
    (("invalid argument", "error while handling argument", "unknown argument"),
     "this llama-server build rejects a flag: run 'swapd check' to find it"),
    (("failed to open GGUF", "failed to load model", "No such file"),
     "the model could not be loaded: check that the profile's model path is a readable "
     "GGUF file this llama-server build supports"),
)


def diagnose(tail: Sequence[str]) -> str:
    """A hint a person can act on, from the child's last lines ('' if none fits)."""
    text = "\n".join(tail)
    for needles, hint in _DIAGNOSES:
        if any(needle in text for needle in needles):
            return f" ({hint})"
    return ""


def describe_exit(code: int | None) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL (the kernel's OOM killer?)``."""
    if code is None or code >= 0:
        return f"exited with code {code}"
    name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
    oom = " (the kernel's OOM killer?)" if -code == signal.SIGKILL else ""
    return f"was killed by {name}{oom}"


def free_port(host: str) -> int:
    """A port the kernel says is free on ``host`` now (``llama_server.port: auto``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
        return False


def port_holder(port: int) -> str | None:
    """Which process listens on ``port`` (``pid 123: llama-server ...``), if /proc says."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1],
                                                             16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir() if inodes else ():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                return f"pid {proc.name}: {' '.join(a.decode(errors='replace') for a in argv)}"
        except OSError:
            continue
    return None


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


class LlamaProcess:
    """A spawned llama-server: its pid (= process group), port, output and exit.

    Also owns the HTTP client swapd uses to reach it, so that stopping the process
    closes every upstream connection first (llama-server lingers on open streams).
    """

    def __init__(self, name: str, argv: Sequence[str], popen: subprocess.Popen[bytes],
                 host: str, port: int, log_sink: ChildLog | None,
                 pidfile: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.pid = popen.pid
        self.host = host
        self.port = port
        self.base_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.started_at = trio.current_time()
        self.ready_at: float | None = None
        self.exit_code: int | None = None
        self.prompt_tps: float | None = None
        """Prompt tokens per second, from the child's own timing lines (None until seen)."""
        self.exited = trio.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            trust_env=False,  # never route loopback through an HTTP(S)_PROXY
            # Plain HTTP on loopback: without this httpx loads the CA bundle, 50-85 ms
            # of blocked event loop at every spawn (bench/README.md).
            verify=False,
            timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=None),
            # llama-server closes idle connections after 5 s (Keep-Alive: timeout=5).
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                                keepalive_expiry=4.0),
        )
        self.pool = ChildPool(host, port)  # the inference hot path (upstream.py says why)
        self._popen = popen
        self._log_sink = log_sink
        self.pidfile = pidfile
        if pidfile is not None:
            write_pidfile(pidfile, self.pid, self.argv[0])
        self._wake = trio.Event()  # set by the readiness line and by the exit
        self._output_done = trio.Event()
        assert popen.stdout is not None
        self._out = trio.lowlevel.FdStream(os.dup(popen.stdout.fileno()))
        popen.stdout.close()

    def __repr__(self) -> str:
        return f"<LlamaProcess {self.name} pid={self.pid} port={self.port}>"

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    # -- tasks that run for the life of the process (in the supervisor's nursery) --

    async def watch(self) -> None:
        """Read the output until EOF and reap the process: both end with the child."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_output)
            nursery.start_soon(self._reap)

    async def _read_output(self) -> None:
        pending = b""
        async with self._out:
            while True:
                try:
                    data = await self._out.receive_some(65536)
                except trio.ClosedResourceError:
                    return
                if not data:
                    break
                pending += data
                *complete, pending = pending.replace(b"\r", b"\n").split(b"\n")
                if len(pending) > 8192:  # a line without end: keep it bounded
                    complete.append(pending)
                    pending = b""
                lines = [raw.decode(errors="replace") for raw in complete if raw.strip()]
                if lines:
                    self.tail.extend(lines)
                    if self._log_sink is not None:
                        self._log_sink.write(lines)
                    if self.ready_at is None and any(h in data for h in READY_HINTS):
                        self._wake.set()
                    elif b"prompt eval time" in data:
                        self._learn_prompt_speed(data)
            if pending.strip():
                line = pending.decode(errors="replace")
                self.tail.append(line)
                if self._log_sink is not None:
                    self._log_sink.write([line])
        self._output_done.set()

    def _learn_prompt_speed(self, data: bytes) -> None:
        for match in PROMPT_TIMING.finditer(data):
            ms, tokens = float(match[1]), int(match[2])
            if tokens >= 64 and ms > 0:  # short prompts are mostly overhead
                tps = 1000 * tokens / ms
                self.prompt_tps = tps if self.prompt_tps is None else (
                    0.7 * self.prompt_tps + 0.3 * tps)

    async def _reap(self) -> None:
        await self.wait_exit()
        log.info("%s (pid %d) exited with code %s", self.name, self.pid, self.exit_code)

    async def wait_exit(self) -> None:
        """Wait for the child to exit and reap it; any number of tasks may wait.

        Each waiter watches its own pidfd, and the first to wake reaps: ``stop`` works
        even when the task running ``watch`` was cancelled (a forced shutdown).
        """
        if self.exited.is_set():
            return
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # already reaped by another waiter, or no pidfd: poll (rare)
            while not self.exited.is_set() and not self._try_reap():  # noqa: ASYNC110
                await trio.sleep(0.05)
            return
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self._try_reap()

    def _try_reap(self) -> bool:
        """Reap the child if it has exited (never blocks); True once it is reaped."""
        if self.exited.is_set():
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return self.exited.is_set()
        if pid == 0:
            return False
        self.exit_code = os.waitstatus_to_exitcode(status)
        self._popen.returncode = self.exit_code  # so Popen's __del__ does not wait again
        if self.pidfile is not None:
            clear_pidfile(self.pidfile, self.pid)
        self.exited.set()
        self._wake.set()
        return True

    # -- readiness --

    async def wait_ready(self, start_timeout: float, interval: float) -> None:
        """Return once ``/health`` answers 200; raise ``StartFailed``/``StartTimeout``."""
        try:
            with trio.fail_after(start_timeout):
                while True:
                    if self.exited.is_set():
                        await self._drain_output()
                        tail = list(self.tail)[-15:]
                        raise StartFailed(
                            self.name, f"llama-server {describe_exit(self.exit_code)} during "
                            f"start{diagnose(tail)}", exit_code=self.exit_code,
                            stderr_tail=tail)
                    if await self._healthy():
                        self.ready_at = trio.current_time()
                        return
                    with trio.move_on_after(interval):
                        await self._wake.wait()
                    if self._wake.is_set() and not self.exited.is_set():
                        self._wake = trio.Event()
        except trio.TooSlowError:
            raise StartTimeout(
                self.name, f"not healthy within {start_timeout:g}s (timeouts.start)",
                stderr_tail=list(self.tail)[-15:]) from None

    @property
    def last_heard(self) -> float:
        """When the child last sent a byte of any answer (``trio.current_time()``)."""
        return self.pool.last_heard

    async def answers_health(self, within: float) -> bool:
        """Whether ``/health`` gets any answer within ``within`` seconds: the liveness
        probe of a ready child. Any status counts; only silence is a miss."""
        with trio.move_on_after(within):
            try:
                response = await self.pool.request(b"GET", b"/health", [], b"")
                try:
                    await response.aread()
                finally:
                    await response.aclose()
            except UpstreamError:
                return False
            return True
        return False

    async def _healthy(self) -> bool:
        """One ``/health`` poll, over the lean client: polls run every 20 ms of a load."""
        try:
            with trio.move_on_after(2.0):
                response = await self.pool.request(b"GET", b"/health", [], b"")
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                return response.status_code == 200
        except UpstreamError:
            pass
        return False

    async def _drain_output(self) -> None:
        """Let the reader collect the last lines of a child that exited.

        Bounded: a grandchild can hold the pipe open long after the child is gone.
        """
        with trio.move_on_after(0.5):
            await self._output_done.wait()

    # -- stopping --

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds, and wait for the reap.

        Shielded, so a cancelled caller cannot leave the model running, and bounded, so
        shutdown cannot hang on it: at most ``grace`` plus a few seconds.
        """
        with trio.CancelScope(shield=True):
            await self.pool.aclose()
            with trio.move_on_after(1.0):
                await self.client.aclose()
            if self.alive:
                self._signal_group(signal.SIGTERM)
                # A stopped process (SIGSTOP, a debugger) would only see the SIGTERM when
                # continued: continue it, so it exits now rather than after the grace.
                self._signal_group(signal.SIGCONT)
                with trio.move_on_after(grace):
                    await self.wait_exit()
            if self.alive:
                log.warning("%s (pid %d) ignored SIGTERM for %gs; sending SIGKILL",
                            self.name, self.pid, grace)
                self._signal_group(signal.SIGKILL)
                with trio.move_on_after(5.0):
                    await self.wait_exit()
            # Grandchildren that outlived the leader would keep the port and the VRAM.
            self._signal_group(signal.SIGKILL)
        return self.exit_code

    def kill_now(self) -> None:
        """SIGKILL the whole group at once (second shutdown signal, crash cleanup)."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)


PIDFILE = "llama-server.pid"


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, its identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def write_pidfile(path: Path, pid: int, program: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "start_ticks": _start_ticks(pid),
                                   "program": program, "swapd_pid": os.getpid()}))
        tmp.replace(path)
    except OSError as error:
        log.warning("cannot write %s: %s", path, error)


def clear_pidfile(path: Path, pid: int) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def leftover_pid(path: Path) -> int | None:
    """The pid an earlier swapd recorded in ``path``, if exactly that process still runs.

    Same pid, same start time and same program, or None: a recycled pid belongs to
    someone else. The record is consumed either way.
    """
    try:
        record = json.loads(path.read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path.unlink(missing_ok=True)
    try:
        program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return None
    started = _start_ticks(pid)
    if started is None or started != record.get("start_ticks"):
        return None
    return pid if program == record.get("program") else None


async def reap_leftover(path: Path, grace: float) -> int | None:
    """Stop a llama-server that an earlier swapd left running; return its pid."""
    pid = leftover_pid(path)
    if pid is None:
        return None
    log.warning("stopping llama-server pid %d left running by an earlier swapd", pid)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return pid  # already gone
    try:
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signum)
            with trio.move_on_after(wait):
                await trio.lowlevel.wait_readable(pidfd)  # readable once it has exited
                break
    finally:
        os.close(pidfd)
    return pid


def launch(config: Config, profile: Profile, log_sink: ChildLog | None,
           extra_argv: Sequence[str] = ()) -> LlamaProcess:
    """Spawn ``profile``'s llama-server on the configured (or a free) loopback port."""
    host = config.llama_server.host
    port = config.llama_server.port
    if port is None:
        port = free_port(host)
    elif port_in_use(host, port):
        holder = port_holder(port)
        raise StartFailed(profile.name, f"port {port} on {host} is in use by "
                          f"{holder.strip() if holder else 'another process'} "
                          "(llama_server.port); stop it or use port: auto")
    return spawn(profile.name, [*build_argv(config, profile, port), *extra_argv],
                 host=host, port=port,
                 env={**config.llama_server.env, **profile.env}, log_sink=log_sink,
                 pidfile=config.state_dir / PIDFILE)


def spawn(name: str, argv: Sequence[str], *, host: str, port: int,
          env: dict[str, str] | None = None, log_sink: ChildLog | None = None,
          pidfile: Path | None = None) -> LlamaProcess:
    """Start the child in its own session with a parent-death signal. Never a shell.

    Raises ``StartFailed`` when the command cannot be executed at all.
    """
    child_env = dict(os.environ)
    child_env.update(env or {})
    try:
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=child_env, start_new_session=True,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )
    except OSError as error:
        raise StartFailed(
            name, f"cannot run {argv[0]!r}: {error.strerror}; set llama_server.command to "
            "the llama-server binary (a name on PATH or a full path)") from None
    log.info("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
    if log_sink is not None:  # so the shared log reads as one section per start
        log_sink.write([f"── swapd: starting {name} (pid {popen.pid}) ──"])
    return LlamaProcess(name, argv, popen, host, port, log_sink, pidfile)
