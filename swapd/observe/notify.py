"""systemd's notify protocol, spoken directly: one datagram per message, no library.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for an
abstract socket) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``).
``Notifier.from_environment()`` reads them once and removes them from ``os.environ``, so
llama-server children (which inherit swapd's environment) never see them. Without
``NOTIFY_SOCKET`` every method is a no-op, so the same code runs under systemd, in a
terminal and in tests. A message that cannot be sent is dropped and logged once: a
notification is never worth failing the daemon for.

How ``serve.py`` uses it::

    notifier = Notifier.from_environment()       # first: children must not inherit it
    async with open_server(config) as running, trio.open_nursery() as nursery:
        line = lambda: status_text(sup.state.value, active_name, last_error=...)
        notifier.ready(status=line())            # READY=1 + STATUS= once listening
        nursery.start_soon(notifier.run_watchdog)                      # WATCHDOG=1
        nursery.start_soon(notifier.run_status_updates, line, sup.wait_changed)
        # on SIGHUP:
        notifier.reloading()                     # RELOADING=1 + MONOTONIC_USEC=
        ...reload (or reject the new config and keep the old one)...
        notifier.ready(status=line())            # READY=1 again, in both cases
        # on SIGTERM/SIGINT, before draining:
        notifier.stopping()                      # STOPPING=1

The watchdog pings come from their own trio task, so they prove that the event loop
turns (a blocking call or a deadlock in the loop stops them, and systemd restarts swapd),
not that a model is healthy: a model that fails is the supervisor's business (restart,
circuit, fallbacks), not a reason for systemd to kill the daemon that serves the others.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping

import trio

log = logging.getLogger(__name__)

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
"""The variables systemd sets for the notify protocol; removed once read."""

STATUS_MAX_CHARS = 200
"""``systemctl status`` shows one line; longer status texts are cut to this."""


class Notifier:
    """Sends ``sd_notify`` messages to one socket address (or nothing, if there is none).

    ``address`` is what ``socket.sendto`` takes: a filesystem path, or ``"\\0name"`` for an
    abstract socket. ``watchdog_seconds`` is systemd's watchdog timeout (None: off).
    """

    def __init__(self, address: str | None, *, watchdog_seconds: float | None = None) -> None:
        self.address = address
        self.watchdog_seconds = watchdog_seconds
        self._socket: socket.socket | None = None
        self._warned = False
        self._last_status: str | None = None

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None, *,
                         unset: bool = True) -> Notifier:
        """A notifier for what systemd passed in ``environ`` (default ``os.environ``).

        With ``unset`` (the default) the variables are removed from ``environ``, as
        ``sd_notify(unset_environment=1)`` does, so child processes do not inherit them.
        """
        env = os.environ if environ is None else environ
        raw_socket = env.get("NOTIFY_SOCKET", "")
        raw_usec = env.get("WATCHDOG_USEC", "")
        raw_pid = env.get("WATCHDOG_PID", "")
        if unset:
            for name in NOTIFY_VARIABLES:
                env.pop(name, None)
        return cls(_socket_address(raw_socket),
                   watchdog_seconds=_watchdog_seconds(raw_usec, raw_pid))

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify (False outside systemd)."""
        return self.address is not None

    # ------------------------------------------------------------------ messages

    def ready(self, *, status: str | None = None) -> bool:
        """``READY=1``: startup (or a reload) is complete, the front end accepts requests."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(self._status_field(status))
        return self.send(*fields)

    def status(self, text: str) -> bool:
        """``STATUS=text``, shown by ``systemctl status``; repeats of the last text are
        not sent again (returns False for them)."""
        field = self._status_field(text)
        if field == self._last_status:
            return False
        return self.send(field)

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown began (drain, then stop the child)."""
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``, which systemd >= 253 requires to match
        the reload to this moment (``Type=notify-reload``); older versions ignore it.
        Send ``ready()`` when the reload is over, whether it was applied or rejected."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the keep-alive ping (``run_watchdog`` sends it on schedule)."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more before systemd's start/stop
        timeout fires (e.g. while a long drain is still making progress)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value`` each) as one datagram; True if it was sent.

        Never raises: without a socket it does nothing, and a failed send (systemd gone,
        its queue full) is logged once and dropped.
        """
        if self.address is None or not fields:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)  # a full receive queue must not stall the trio loop
                self._socket = sock
            self._socket.sendto(message, self.address)
        except OSError as error:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %r: %s (later failures are not "
                            "logged)", _printable(self.address), error)
            return False
        for field in fields:
            if field.startswith("STATUS="):
                self._last_status = field
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # ------------------------------------------------------------------- tasks

    async def run_watchdog(self) -> None:
        """Ping the watchdog every ``watchdog_seconds / 2`` until cancelled; returns at
        once when systemd asked for no watchdog (or there is no socket)."""
        if self.address is None or not self.watchdog_seconds:
            return
        interval = self.watchdog_seconds / 2
        while True:
            self.watchdog()
            await trio.sleep(interval)

    async def run_status_updates(self, text: Callable[[], str],
                                 changed: Callable[[], Awaitable[None]]) -> None:
        """Send ``STATUS=text()`` now and after every ``changed()`` (e.g. the supervisor's
        ``wait_changed``), until cancelled. Unchanged texts are not re-sent."""
        if self.address is None:
            return
        while True:
            self.status(text())  # no checkpoint between reading and waiting: none missed
            await changed()

    def _status_field(self, text: str) -> str:
        line = " ".join(text.split())  # one line: a newline would end the field
        if len(line) > STATUS_MAX_CHARS:
            line = line[:STATUS_MAX_CHARS - 1] + "…"
        return f"STATUS={line}"


def status_text(state: str, active: str | None, *, last_error: str | None = None) -> str:
    """The ``STATUS=`` line: ``ready qwen``, ``starting qwen``, ``idle``, ``failed: why``."""
    text = f"{state} {active}" if active else state
    if last_error and state == "failed":
        text += f": {last_error}"
    return text


def _socket_address(raw: str) -> str | None:
    """``NOTIFY_SOCKET`` as a ``sendto`` address: a path, or ``@name`` -> ``\\0name``."""
    if not raw:
        return None
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    log.warning("NOTIFY_SOCKET=%r is not a unix socket path or @abstract name; systemd "
                "will not be notified", raw)
    return None


def _watchdog_seconds(raw_usec: str, raw_pid: str) -> float | None:
    """The watchdog timeout, if it is meant for this process (``WATCHDOG_PID``)."""
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
        pid = int(raw_pid) if raw_pid else None
    except ValueError:
        log.warning("ignoring unreadable WATCHDOG_USEC=%r / WATCHDOG_PID=%r",
                    raw_usec, raw_pid)
        return None
    if usec <= 0 or (pid is not None and pid != os.getpid()):
        return None
    return usec / 1_000_000


def _printable(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address
