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

The death signal reaches only the direct child. A ``command`` that is a wrapper script
(llama-server started without ``exec``) or a program that leaves helpers behind has
descendants it does not reach, and some may leave the process group or the session. So
every child carries ``CHILD_MARKER`` in its environment, which all its descendants
inherit: ``stop`` and ``kill_now`` kill whatever still carries it after the group is
gone, and a swapd that starts on the same ``state_dir`` (holding its lock) stops every
process with its owner's marker, and every process of the session the pidfile recorded,
before it listens (``reap_leftovers``). Under systemd, ``KillMode=mixed`` also kills the
unit's whole cgroup once swapd is gone, so nothing outlives it there even until then.
Not ``PR_SET_CHILD_SUBREAPER``: swapd would then have to reap every orphaned descendant
itself, racing the reaping of its own children, while the marker finds the same
processes and, unlike a subreaper, still finds them after a restart.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import attrs
import httpx
import trio

from swapd.config import Config, Profile, host_port
from swapd.config.argv import build_argv
from swapd.core.statedir import WriteErrors
from swapd.errors import StartFailed, StartTimeout
from swapd.net.upstream import ChildPool, UpstreamError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

READY_HINTS = (b"model loaded", b"listening on", b"server is listening")
"""Substrings of llama-server's stderr that make a /health poll worth doing at once."""

PROMPT_TIMING = re.compile(rb"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
"""llama-server's per-request timing line; swapd learns each model's prompt speed from it."""

SETPRIV_PROBE_TIMEOUT = 5.0
"""Asking ``setpriv --help`` once whether it has ``--pdeathsig`` (util-linux 2.33+)."""

HEALTH_POLL_TIMEOUT = 2.0
"""One readiness poll of ``/health`` while a model loads (polls repeat every 20 ms)."""

PROPS_READ_TIMEOUT = 2.0
"""Reading a child's ``/props`` once after it loaded (the context a request gets)."""

REAP_POLL_INTERVAL = 0.05
"""How often to look for the exit of a child without a pidfd (old kernels; rare)."""

OUTPUT_DRAIN_TIMEOUT = 0.5
"""How long the last lines of a child that exited may take to arrive (a grandchild can
hold the pipe open for ever)."""

CLIENT_CLOSE_TIMEOUT = 1.0
"""Closing the child's HTTP client on stop; its connections are loopback."""

KILL_WAIT_TIMEOUT = 5.0
"""After SIGKILL, the longest wait for the kernel to end a process (it takes
milliseconds unless the process is in uninterruptible sleep, e.g. a stuck GPU driver)."""

MAX_BUFFER_LINES = 256
"""Buffer-size lines kept per child (one per device and kind of buffer; a bound)."""

TAIL_LINES = 40
"""Lines of the child's own output kept for error messages (exit code + stderr tail)."""


class ChildLog:
    """Output of every child swapd ran: recent lines in memory, all of them in a file.

    The file lives in ``state_dir`` and is rotated to ``<name>.1`` when it passes
    ``max_bytes``, so a chatty model can never fill the disk. Each batch of lines read
    from the pipe is one unbuffered write: the kernel's page cache absorbs them.

    A write that fails (a full disk, a read-only state_dir) never stops the reading, so
    the model keeps serving: the lines stay in memory, ``errors`` counts the failure and
    warns once, and the next batch tries again (reopening the file).
    """

    def __init__(self, path: Path | None, *, max_bytes: int, tail_lines: int,
                 errors: WriteErrors | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.errors = errors if errors is not None else WriteErrors()
        self.lines: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.written = 0
        """Lines written so far; readers of ``lines`` use it to find what is new."""
        self._changed = trio.Event()
        self._file: io.FileIO | None = None
        if path is not None:
            with contextlib.suppress(OSError):  # counted at the first write that fails
                self._open()

    def write(self, lines: Sequence[str]) -> None:
        self.lines.extend(lines)
        self.written += len(lines)
        if self.path is not None:
            self._write_file("".join(line + "\n" for line in lines).encode())
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _open(self) -> io.FileIO:
        assert self.path is not None
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = io.FileIO(self.path, "ab")
        return self._file

    def _write_file(self, data: bytes) -> None:
        assert self.path is not None
        try:
            file = self._open()
            view = memoryview(data)
            while view:  # a short write is possible on a nearly full disk
                written = file.write(view)
                if not written:
                    raise OSError(errno.EIO, "the log file took no bytes")
                view = view[written:]
            if file.tell() > self.max_bytes:
                self._rotate()
        except OSError as error:
            self.close()  # the next write reopens: the disk may have room again
            self.errors.failed("log", self.path, error)
        else:
            self.errors.succeeded("log")

    def _rotate(self) -> None:
        assert self.path is not None
        self.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._open()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


OOM_HINTS = ("out of memory", "cudaMalloc failed", "failed to allocate",
             "ErrorOutOfDeviceMemory")
"""What llama-server prints when (GPU) memory ran out while it loads."""

_DIAGNOSES = (  # most specific first: an OOM also ends in "failed to load model"
    (OOM_HINTS,
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


def is_oom(tail: Sequence[str]) -> bool:
    """Did the child run out of (GPU) memory, by its last lines?"""
    text = "\n".join(tail)
    return any(hint in text for hint in OOM_HINTS)


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


@attrs.frozen
class PortHolder:
    """A process listening on a port swapd needs."""

    pid: int
    argv: tuple[str, ...]

    @property
    def program(self) -> str:
        return os.path.basename(self.argv[0]) if self.argv and self.argv[0] else "?"

    def __str__(self) -> str:
        """Its pid and program name only: its command line may hold secrets."""
        return f"pid {self.pid} ({self.program})"


def port_holder(port: int) -> PortHolder | None:
    """Which process listens on ``port``, if /proc says."""
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
                argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
                return PortHolder(int(proc.name),
                                  tuple(a.decode(errors="replace") for a in argv))
        except OSError:
            continue
    return None


@functools.cache
def _setpriv() -> str | None:
    """util-linux's ``setpriv`` if it can set a parent-death signal, else None.

    Setting the death signal from Python (``preexec_fn``) makes ``subprocess`` fork the
    whole daemon and run Python in the copy before exec: 10.8 ms per spawn here, against
    0.8 ms for ``setpriv --pdeathsig KILL -- llama-server ...``, which lets it vfork and
    sets the signal in C right before it execs the model (the signal survives exec).
    """
    found = shutil.which("setpriv")
    if found is None:
        return None
    try:
        help_text = subprocess.run([found, "--help"], capture_output=True, text=True,
                                   timeout=SETPRIV_PROBE_TIMEOUT).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return found if "--pdeathsig" in help_text else None


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec (where there is no ``setpriv``)."""
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
                 pidfile: Path | None = None, marker: str | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.pid = popen.pid
        self.host = host
        self.port = port
        self.base_url = f"http://{host_port(host, port)}"
        self.started_at = trio.current_time()
        self.ready_at: float | None = None
        self.exit_code: int | None = None
        self.prompt_tps: float | None = None
        """Prompt tokens per second, from the child's own timing lines (None until seen)."""
        self.exited = trio.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.buffer_lines: list[str] = []
        """llama-server's ``... buffer size = N MiB`` lines, kept whole (at ``-lv 4`` a load
        prints ~170 lines, and the tail would have lost the first ones by readiness)."""
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
        self.marker = marker
        """This child's ``SWAPD_CHILD_OF`` value, inherited by all its descendants."""
        if pidfile is not None:
            write_pidfile(pidfile, self.pid, self.argv[0], marker=marker,
                          errors=log_sink.errors if log_sink is not None else None)
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
                    if b"buffer size" in data and len(self.buffer_lines) < MAX_BUFFER_LINES:
                        self.buffer_lines += [line for line in lines if "buffer size" in line]
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
                await trio.sleep(REAP_POLL_INTERVAL)
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

    async def slot_context(self) -> int | None:
        """The context one request gets, as the child says: ``/props``
        ``default_generation_settings.n_ctx`` (the per-slot value it checks prompts
        against). None when it does not say within :data:`PROPS_READ_TIMEOUT`."""
        with trio.move_on_after(PROPS_READ_TIMEOUT):
            try:
                # Connection: close: an idle keep-alive connection holds one of the
                # child's few HTTP threads, which its requests and probes then lack.
                response = await self.client.get("/props", headers={"Connection": "close"})
                settings = response.json().get("default_generation_settings")
            except (httpx.HTTPError, ValueError, AttributeError):
                return None
            n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
            if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0:
                return n_ctx
        return None

    async def _healthy(self) -> bool:
        """One ``/health`` poll, over the lean client: polls run every 20 ms of a load."""
        try:
            with trio.move_on_after(HEALTH_POLL_TIMEOUT):
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
        with trio.move_on_after(OUTPUT_DRAIN_TIMEOUT):
            await self._output_done.wait()

    # -- stopping --

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds, and wait for the reap.

        Shielded, so a cancelled caller cannot leave the model running, and bounded, so
        shutdown cannot hang on it: at most ``grace`` plus a few seconds.
        """
        with trio.CancelScope(shield=True):
            await self.pool.aclose()
            with trio.move_on_after(CLIENT_CLOSE_TIMEOUT):
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
                with trio.move_on_after(KILL_WAIT_TIMEOUT):
                    await self.wait_exit()
            # Grandchildren that outlived the leader would keep the port and the VRAM.
            self._signal_group(signal.SIGKILL)
            await self._kill_descendants()
        return self.exit_code

    def kill_now(self) -> None:
        """SIGKILL the whole group at once (second shutdown signal, crash cleanup), and
        every descendant that left it."""
        self._signal_group(signal.SIGKILL)
        if self.marker is not None:
            for pidfd in _kill_marked(self.marker).values():
                os.close(pidfd)

    async def _kill_descendants(self) -> None:
        """SIGKILL what still carries this child's marker (it may have left the process
        group, or the session), and wait until it is gone: at most a few seconds."""
        if self.marker is None:
            return
        killed = await trio.to_thread.run_sync(_kill_marked, self.marker)
        try:
            if killed:
                log.info("%s (pid %d): killed %d more process(es) it started: %s", self.name,
                         self.pid, len(killed), ", ".join(map(str, sorted(killed))))
            with trio.move_on_after(KILL_WAIT_TIMEOUT):
                for pidfd in killed.values():
                    await trio.lowlevel.wait_readable(pidfd)  # readable once it exited
        finally:
            for pidfd in killed.values():
                os.close(pidfd)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)


PIDFILE = "llama-server.pid"

CHILD_MARKER = "SWAPD_CHILD_OF"
"""Set in every child's environment to ``<owner>:<spawn id>``, where the owner is a hash
of swapd's ``state_dir`` (``owner_mark``). Every descendant inherits it, even one that
left the child's session (``setsid``), so it finds what a child left behind: after a
stop, and after a swapd that was SIGKILLed (only its direct child gets the kernel's
death signal; a wrapper script's llama-server is a grandchild)."""

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def owner_mark(state_dir: Path) -> str:
    """The part of every child's marker that names its swapd (one per ``state_dir``)."""
    return hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:16]


def _stat(pid: int) -> tuple[int, int] | None:
    """(session id, start time in clock ticks since boot) of a live process, else None.

    With the pid, the start time is a process's identity: a recycled pid starts later.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # exited, only not reaped yet: nothing left to stop
        return None
    return int(fields[3]), int(fields[19])


def _start_ticks(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def _marker_of(pid: int) -> bytes | None:
    """The value of ``SWAPD_CHILD_OF`` in the process's environment, if it has one."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read (then not ours to stop either)
        return None
    prefix = CHILD_MARKER.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):]
    return None


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return None


def write_pidfile(path: Path, pid: int, program: str, *, marker: str | None = None,
                  errors: WriteErrors | None = None) -> None:
    """Record the child (its pid is also its session id) for a swapd that comes after.

    A failed write is counted and warned about once, never fatal: the marker still
    finds the child.
    """
    record = {"pid": pid, "session": pid, "start_ticks": _start_ticks(pid),
              "boot_id": _boot_id(), "program": program, "marker": marker,
              "swapd_pid": os.getpid()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    except OSError as error:
        if errors is None:
            log.warning("cannot write %s: %s", path, error)
        else:
            errors.failed("pidfile", path, error)
    else:
        if errors is not None:
            errors.succeeded("pidfile")


def clear_pidfile(path: Path, pid: int) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def find_leftovers(state_dir: Path) -> dict[int, int]:
    """What an earlier swapd on ``state_dir`` left running: ``{pid: start ticks}``.

    Only for the holder of the state_dir lock (``statedir.lock_state_dir``): every
    process found is then stale by definition. Found are every process that carries the
    owner's marker (``CHILD_MARKER``), and every process of the session the pidfile
    names, if that session is still the recorded one: its leader has the recorded start
    time, or is gone on the same boot (a session id cannot be reused while a process is
    in that session; members that started before the leader belong to someone else;
    the residual risk is a later session that reused exactly that id and lost its own
    leader too). The pidfile is consumed.
    """
    record: dict[str, object] = {}
    path = state_dir / PIDFILE
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text())
        record = loaded if isinstance(loaded, dict) else {}
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
    session = _recorded_session(record)
    owner = owner_mark(state_dir).encode() + b":"
    me = os.getpid()
    found: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        stat = _stat(pid)
        if stat is None:
            continue
        sid, start = stat
        in_session = session is not None and sid == session[0] and start >= session[1]
        marker = None if in_session else _marker_of(pid)
        if in_session or (marker is not None and marker.startswith(owner)):
            found[pid] = start
    return found


def _recorded_session(record: dict[str, object]) -> tuple[int, int] | None:
    """(session id, its leader's start ticks) from a pidfile record, if still that one."""
    sid, started = record.get("session", record.get("pid")), record.get("start_ticks")
    if not isinstance(sid, int) or not isinstance(started, int):
        return None
    leader = _stat(sid)
    if leader is None:  # the leader is gone; on another boot, so is its session
        same_boot = record.get("boot_id") is not None and record.get("boot_id") == _boot_id()
        return (sid, started) if same_boot else None
    if leader[1] != started:
        return None  # a recycled pid: someone else's process
    try:
        program = Path(f"/proc/{sid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return None
    marker = _marker_of(sid)
    # Same pid and start time: the same process, unless it exec'd something else since.
    ours = program == record.get("program") or (
        marker is not None and marker.decode(errors="replace") == record.get("marker"))
    return (sid, started) if ours else None


async def reap_leftovers(state_dir: Path, grace: float) -> list[int]:
    """Stop what an earlier swapd on ``state_dir`` left running; return the pids.

    SIGTERM, then SIGKILL after ``grace`` seconds; returns once they have exited (at
    most ``grace`` + 5 s), so a new child never starts beside an old one.
    """
    found = await trio.to_thread.run_sync(find_leftovers, state_dir)
    if found:
        log.warning("stopping %d process(es) left running by an earlier swapd on %s: %s",
                    len(found), state_dir, ", ".join(map(str, sorted(found))))
        await _stop_all(found, grace)
    return sorted(found)


async def _stop_all(found: dict[int, int], grace: float) -> None:
    pidfds: list[int] = []
    try:
        for pid, started in found.items():
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # already gone
            pidfds.append(pidfd)
            if _start_ticks(pid) != started:  # gone and its pid reused since the scan
                pidfds.pop()
                os.close(pidfd)
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pidfd in pidfds:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signum)
            with trio.move_on_after(wait) as waited:
                for pidfd in pidfds:
                    await trio.lowlevel.wait_readable(pidfd)  # readable once it exited
            if not waited.cancelled_caught:
                return
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


def _kill_marked(marker: str) -> dict[int, int]:
    """SIGKILL every process that carries exactly ``marker``: a stopped child's leftovers
    outside its process group. Returns ``{pid: pidfd}`` to wait on (caller closes)."""
    needle = marker.encode()
    me = os.getpid()
    killed: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me or _marker_of(int(name)) != needle:
            continue
        try:
            pidfd = os.pidfd_open(int(name))
        except OSError:
            continue
        if _marker_of(int(name)) != needle:  # exited, and the pid reused, since the read
            os.close(pidfd)
            continue
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        killed[int(name)] = pidfd
    return killed


def launch(config: Config, profile: Profile, log_sink: ChildLog | None,
           extra_argv: Sequence[str] = ()) -> LlamaProcess:
    """Spawn ``profile``'s llama-server on the configured (or a free) loopback port."""
    host = config.llama_server.host
    port = config.llama_server.port
    if port is None:
        port = free_port(host)
    elif port_in_use(host, port):
        holder = port_holder(port)
        if holder is not None:  # the whole command line for the operator, not for clients
            log.warning("port %d on %s is held by pid %d: %s", port, host, holder.pid,
                        " ".join(holder.argv))
        raise StartFailed(profile.name, f"port {port} on {host} is in use by "
                          f"{holder or 'another process'} "
                          "(llama_server.port); stop it or use port: auto")
    return spawn(profile.name, [*build_argv(config, profile, port), *extra_argv],
                 host=host, port=port,
                 env={**config.llama_server.env, **profile.env}, log_sink=log_sink,
                 pidfile=config.state_dir / PIDFILE)


def spawn(name: str, argv: Sequence[str], *, host: str, port: int,
          env: dict[str, str] | None = None, log_sink: ChildLog | None = None,
          pidfile: Path | None = None) -> LlamaProcess:
    """Start the child in its own session with a parent-death signal. Never a shell.

    Its environment carries ``CHILD_MARKER``, naming the swapd that owns ``pidfile``'s
    directory. Raises ``StartFailed`` when the command cannot be executed at all.
    """
    child_env = dict(os.environ)
    child_env.update(env or {})
    # The pidfile lives in state_dir: its directory names the swapd that owns the child.
    owner = owner_mark(pidfile.parent) if pidfile is not None else ""
    marker = f"{owner}:{secrets.token_hex(6)}"
    child_env[CHILD_MARKER] = marker
    setpriv = _setpriv()
    program = shutil.which(argv[0], path=child_env.get("PATH"))
    try:
        if program is None:  # setpriv would report it only as its own exit code 127
            code = errno.EACCES if os.path.exists(argv[0]) else errno.ENOENT
            raise OSError(code, os.strerror(code))
        if setpriv is not None:
            popen = subprocess.Popen(
                [setpriv, "--pdeathsig", "KILL", "--", program, *argv[1:]],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=child_env, start_new_session=True)
        else:
            popen = subprocess.Popen(
                [program, *argv[1:]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=child_env, start_new_session=True,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()))
    except OSError as error:
        raise StartFailed(
            name, f"cannot run {argv[0]!r}: {error.strerror}; set llama_server.command to "
            "the llama-server binary (a name on PATH or a full path)") from None
    log.info("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
    if log_sink is not None:  # so the shared log reads as one section per start
        log_sink.write([f"── swapd: starting {name} (pid {popen.pid}) ──"])
    return LlamaProcess(name, argv, popen, host, port, log_sink, pidfile, marker)
