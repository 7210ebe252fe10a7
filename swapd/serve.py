"""``swapd serve``: the supervisor and the HTTP server in one trio run.

Shutdown order (SIGTERM/SIGINT): the listener stops accepting and in-flight requests
(fast path and hypercorn alike) get ``timeouts.drain`` to finish, then the supervisor
stops the child, then the process exits 0. A second signal skips the wait: the child is
killed at once.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets

from swapd.config import Config, load_config
from swapd.core import Launcher, Supervisor, process
from swapd.core.statedir import StateLock, WriteErrors, lock_state_dir
from swapd.errors import ConfigError, StateDirBusy, SwapdError
from swapd.http.app import Frontend, frontend_for, served_app
from swapd.http.auth import load_keys
from swapd.http.fallback import FallbackChain
from swapd.http.fastpath import MAX_HEAD_BYTES, FastPath
from swapd.http.ollama import OllamaApi
from swapd.http.proxy import InferenceProxy
from swapd.observe.notify import Notifier, status_text

log = logging.getLogger("swapd")

FALLBACK_CLIENTS_CLOSE_TIMEOUT = 2.0
"""Closing the fallback chain's HTTP clients at exit (remote connections)."""


@attrs.define
class Running:
    """A started swapd: what tests and the signal handler need to reach."""

    frontend: Frontend
    fastpath: FastPath
    urls: list[str]
    shutdown: trio.Event

    @property
    def supervisor(self) -> Supervisor:
        return self.frontend.supervisor

    @property
    def url(self) -> str:
        return self.urls[0]


class _HypercornConfig(HypercornConfig):
    """Hypercorn's config, with a send deadline on every accepted connection.

    Hypercorn writes to a client inside a cancel shield with no deadline, so a client
    that stops reading (its window at zero) blocks that request's task forever: neither
    ``http.disconnect`` nor a lease revocation can end it. ``TCP_USER_TIMEOUT`` on the
    listening socket (accepted sockets inherit it) makes the kernel abort a connection
    whose sent data has gone unacknowledged, zero-window probes included, for
    ``send_timeout`` seconds: the blocked write fails and the request ends.
    """

    send_timeout: float | None = None

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        if self.send_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                    max(1, round(self.send_timeout * 1000)))
        return sockets


def fast_path(frontend: Frontend) -> FastPath:
    """The server for ``frontend``: inference on the fast path, the rest on Quart."""
    proxy = InferenceProxy(frontend.supervisor, frontend.fallbacks, frontend.metrics)
    return FastPath(lambda: frontend.config,
                    lambda path, headers: frontend.keys.allows(path, headers),
                    OllamaApi(proxy),
                    served_app(frontend), hypercorn_config(frontend.config))


def hypercorn_config(config: Config) -> HypercornConfig:
    hc = _HypercornConfig()
    hc.bind = [config.listen.address]
    hc.graceful_timeout = config.timeouts.drain
    # A connection's idle timer runs from its accept (and from the end of each answer)
    # until a complete request head arrives: the deadline on slow or stalled headers.
    hc.keep_alive_timeout = config.timeouts.headers
    hc.h11_max_incomplete_size = MAX_HEAD_BYTES
    # Hypercorn's read_timeout bounds *every* read of a connection, including the wait
    # for a disconnect while a long answer is sent: it would cut long generations. The
    # body has its own deadline (timeouts.body, BodyReader), writes theirs (send_timeout).
    hc.read_timeout = None
    hc.send_timeout = config.timeouts.send
    hc.include_server_header = False
    hc.include_date_header = False  # answers carry llama-server's own Date
    hc.backlog = 4096  # 200 clients connecting at once otherwise wait on SYN retries
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


@asynccontextmanager
async def open_server(config: Config, *, launcher: Launcher = process.launch,
                      config_path: Path | None = None) -> AsyncIterator[Running]:
    """Run swapd inside the caller's trio run until the block exits, then shut it down.

    Owns ``config.state_dir`` meanwhile: raises ``StateDirBusy`` if another swapd does,
    before anything there (its pidfile, its child) is touched.
    """
    state_writes = WriteErrors()
    lock = lock_state_dir(config.state_dir, [f"http://{config.listen.address}"]
                          if config.listen.port else [], state_writes)
    try:
        async with _open_server(config, launcher, config_path, lock, state_writes) as running:
            yield running
    finally:
        lock.release()  # last: the child is stopped and every file in state_dir closed


@asynccontextmanager
async def _open_server(config: Config, launcher: Launcher, config_path: Path | None,
                       lock: StateLock, state_writes: WriteErrors) -> AsyncIterator[Running]:
    child_log = process.ChildLog(config.state_dir / "llama-server.log",
                                 max_bytes=config.logs.max_bytes,
                                 tail_lines=config.logs.tail_lines, errors=state_writes)
    supervisor = Supervisor(config, child_log=child_log, launcher=launcher)
    fallbacks = FallbackChain(config.fallbacks)
    frontend = await trio.to_thread.run_sync(frontend_for, config, supervisor, child_log,
                                             fallbacks, config_path)
    fastpath = fast_path(frontend)
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            nursery.start_soon(frontend.metrics.follow_events)
            urls = await nursery.start(fastpath.serve, shutdown.wait)
            lock.describe(urls)
            running = Running(frontend, fastpath, urls, shutdown)
            try:
                yield running
            finally:
                # Both drain at once: the server its requests, the supervisor its leases
                # (waiters get 503 now); the child stops when the last lease is back.
                shutdown.set()
                await supervisor.shutdown()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(FALLBACK_CLIENTS_CLOSE_TIMEOUT):
            await fallbacks.aclose()
        child_log.close()


async def _main(config: Config, config_path: Path) -> int:
    """Serve until SIGTERM/SIGINT; a second one stops at once. Returns the exit status."""
    forced = False
    notifier = Notifier.from_environment()  # before any child can inherit NOTIFY_SOCKET
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            async with open_server(config, config_path=config_path) as running:
                log.info("swapd listening on %s with %d profile(s)", ", ".join(running.urls),
                         len(config.profiles))
                status = partial(_status_line, running.supervisor)
                notifier.ready(status=status())
                nursery.start_soon(notifier.run_watchdog)
                nursery.start_soon(notifier.run_status_updates, status,
                                   running.supervisor.wait_changed)
                await _until_stop_signal(signals, running, notifier)
                notifier.stopping()

                async def stop_now_on_second_signal() -> None:
                    nonlocal forced
                    async for signum in signals:
                        if signum != signal.SIGHUP:
                            log.warning("second %s: stopping without waiting for requests",
                                        signal.Signals(signum).name)
                            forced = True
                            running.supervisor.kill_now()  # a command, not a crash
                            nursery.cancel_scope.cancel()  # cuts the graceful drain short
                            return

                nursery.start_soon(stop_now_on_second_signal)
            nursery.cancel_scope.cancel()  # drained in time: stop watching for signals
    return 1 if forced else 0


def _status_line(supervisor: Supervisor) -> str:
    error = supervisor.last_error
    return status_text(supervisor.state.value,
                       supervisor.active.name if supervisor.active else None,
                       last_error=str(error).splitlines()[0] if error else None)


async def _until_stop_signal(signals: AsyncIterator[int], running: Running,
                             notifier: Notifier) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            notifier.reloading()
            try:
                await running.frontend.reload()
            except ConfigError as error:
                log.error("SIGHUP: reload rejected; the running config stays:\n%s", error)
            notifier.ready(status=_status_line(running.supervisor))
            continue
        log.info("%s: shutting down (again to stop at once)", signal.Signals(signum).name)
        return


def run(config_path: str | os.PathLike[str]) -> int:
    logging.basicConfig(
        level=os.environ.get("SWAPD_LOG_LEVEL", "INFO").upper(),
        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request
    config: Config | None = None
    try:
        config = load_config(config_path)
        load_keys(config.security)  # a named but missing key source fails here, plainly
        Path(config.state_dir).mkdir(parents=True, exist_ok=True)
        return trio.run(_main, config, Path(config_path))
    except (SwapdError, OSError, BaseExceptionGroup) as error:
        cause = _startup_cause(error, config)
        if cause is None:
            raise
        print(f"swapd: {cause}", file=sys.stderr)
        return 1


def _startup_cause(error: BaseException, config: Config | None = None) -> str | None:
    """One line for a failure a person fixes outside swapd (a taken port, a bad config,
    a full or unwritable state_dir, a missing key file, another swapd on the same
    state_dir); None for anything else (a bug)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if isinstance(error, ConfigError | StateDirBusy):
        return str(error)
    if not isinstance(error, OSError):
        return None
    what = error.strerror or str(error)
    listen = config.listen.address if config is not None else "the listen address"
    state_dir = config.state_dir if config is not None else "state_dir"
    if error.filename is None:  # a socket call: binding the listen address
        if error.errno == errno.EADDRINUSE:
            return (f"{what}: {listen} is taken by another process (another swapd, or "
                    "another service: ss -ltnp); stop it or choose another 'listen'")
        if error.errno == errno.EADDRNOTAVAIL:
            return f"{what}: this host has no address {listen}; fix 'listen'"
        if error.errno in (errno.EACCES, errno.EPERM):
            return (f"{what}: not allowed to listen on {listen} (a port below 1024 needs "
                    "privileges); choose a port above 1023 in 'listen'")
        return f"{what} (listen {listen})"
    where = error.filename
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{what}: {where}; the file system of state_dir ({state_dir}) is full: "
                "free some space there")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{what}: {where}; swapd's user cannot write to state_dir ({state_dir}): "
                "fix its owner or mode (under systemd: StateDirectory= or ReadWritePaths=)")
    return f"{what}: {where}"
