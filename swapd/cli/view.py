"""What the operator reads: status tables, events as lines, and a load's progress (redrawn
on a terminal, a line every few seconds in a log).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from swapd.cli.remote import Remote

PROGRESS_TTY_INTERVAL = 0.2
"""Seconds between redraws of the load progress line on a terminal."""


PROGRESS_LINE_INTERVAL = 2.0
"""Seconds between progress lines when stdout is not a terminal (a log, a pipe)."""


def format_status(status: Mapping[str, Any], *, url: str) -> list[str]:
    """``/swapd/status`` as a compact table for people."""
    lines = [f"swapd {status.get('version', '?')} at {url}"]
    state = str(status.get("state", "?"))
    active = status.get("active")
    what = state
    if active:
        details = [f"pid {status['pid']}"] if status.get("pid") else []
        if status.get("port"):
            details.append(f"port {status['port']}")
        if status.get("uptime") is not None:
            details.append(f"up {format_duration(status['uptime'])}")
        what += f": {active}" + (f" ({', '.join(details)})" if details else "")
    if status.get("draining"):
        what += ", draining"
    lines.append(f"{'state':<11}{what}")
    if state == "starting" and active:
        progress = _load_text(active, float(status.get("load_elapsed") or 0),
                              status.get("load_expected"))
        lines.append(f"{'loading':<11}{progress}")
    waiting = status.get("waiting") or {}
    queue = ", ".join(f"{name} {count}" for name, count in waiting.items()) or "none"
    lines.append(f"{'requests':<11}{status.get('inflight', 0)} in flight; waiting: {queue}")
    lines.append(f"{'swaps':<11}{status.get('swaps', 0)} "
                 f"({status.get('starts_failed', 0)} failed starts, "
                 f"{status.get('crashes', 0)} crashes)")
    for row in status.get("resident") or ():
        details = [f"pid {row['pid']}"] if row.get("pid") else []
        if row.get("gpus"):
            details.append("GPU " + ",".join(map(str, row["gpus"])))
        if row.get("planned"):
            details.append(f"{_gib(row['planned'])} planned")
        details.append(f"{row.get('inflight', 0)} in flight")
        flags = (" pinned" if row.get("pinned") else "") + (
            " draining" if row.get("draining") else "")
        lines.append(f"{'resident':<11}{row['name']} {row['state']}{flags} "
                     f"({', '.join(details)})")
    for gpu in status.get("gpus") or ():
        if gpu.get("budget"):
            measured = f", {_gib(gpu['measured'])} measured" if gpu.get("measured") else ""
            lines.append(f"{'gpu ' + str(gpu['id']):<11}{_gib(gpu['planned'])} of "
                         f"{_gib(gpu['budget'])} planned{measured}")
    circuits = status.get("circuits") or {}
    if not any(c.get("state") != "closed" for c in circuits.values()):
        lines.append(f"{'circuits':<11}all closed")
    for name, circuit in circuits.items():
        if circuit.get("state") == "closed":
            continue
        why = f": {circuit['last_error']}" if circuit.get("last_error") else ""
        lines.append(f"{'circuit':<11}{name} {circuit.get('state')} after "
                     f"{circuit.get('failures')} failures in a row{why}")
    error = status.get("last_error")
    if error:
        code = error.get("exit_code")
        message = str(error.get("message"))
        if code is not None and f"code {code}" not in message:
            message += f" (exit code {code})"
        lines.append(f"{'last error':<11}{message}")
        lines += [f"{'':<11}| {line}" for line in error.get("stderr_tail") or ()]
    for fallback in status.get("fallbacks") or ():
        health = {None: "not checked yet", True: "up"}.get(
            fallback.get("healthy"), f"down: {fallback.get('problem')}")
        lines.append(f"{'fallback':<11}{fallback.get('name')} -> {fallback.get('model')} "
                     f"at {fallback.get('base_url')} ({health}, served "
                     f"{fallback.get('served', 0)})")
    profiles = status.get("profiles") or {}
    if profiles:
        load_seconds = status.get("load_seconds") or {}
        rows = [("PROFILE", "STATUS", "CONTEXT", "LAST LOAD", "ALIASES")]
        for name, profile in profiles.items():
            seconds = load_seconds.get(name)
            rows.append((name, str(profile.get("status", "?")),
                         str(profile.get("context_length") or "-"),
                         f"{seconds:.2f}s" if seconds is not None else "-",
                         ", ".join(profile.get("aliases") or ())))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines.append("")
        for row in rows:
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  "
                         f"{row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}  {row[4]}".rstrip())
    return lines


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def format_duration(seconds: float) -> str:
    """``0.35s``, ``4.2s``, ``42s``, ``3m05s``, ``2h07m``."""
    if seconds < 1:
        return f"{seconds:.2f}s"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _load_text(profile: str, elapsed: float, expected: float | None) -> str:
    """``loading b… 40% (ETA 3.1s)``, from the elapsed time and the last load's time."""
    if not expected:
        so_far = f" {format_duration(elapsed)}" if elapsed >= 0.5 else ""
        return f"loading {profile}…{so_far} (first load: no estimate yet)"
    if elapsed < expected:
        percent = min(99, int(100 * elapsed / expected))
        return f"loading {profile}… {percent}% (ETA {format_duration(expected - elapsed)})"
    return (f"loading {profile}… {format_duration(elapsed)} (longer than the last load, "
            f"{format_duration(expected)})")


@attrs.define
class LoadView:
    """What ``swapd load`` prints, driven by swapd's events: phases as lines, and a
    progress line that a terminal redraws in place."""

    remote: Remote
    profile: str
    loading: bool = False
    load_began: float = 0.0  # trio time the load began (corrected for a late start)
    expected: float | None = None
    settled: trio.Event = attrs.field(factory=trio.Event)
    ready_line_printed: bool = False
    stop_began: dict[str, float] = attrs.field(factory=dict)
    _progress_shown: bool = False

    @property
    def tty(self) -> bool:
        isatty = getattr(self.remote.out, "isatty", None)
        return bool(isatty and isatty())

    def on_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("kind")
        profile = event.get("profile")
        now = trio.current_time()
        if kind == "status":  # a snapshot: join a load that is already under way
            if (event.get("state") == "starting" and event.get("active") == self.profile
                    and not self.loading):
                self._begin(now - float(event.get("load_elapsed") or 0.0),
                            event.get("load_expected"))
        elif kind == "draining" and profile != self.profile:
            inflight = event.get("inflight", 0)
            if inflight:
                self.line(f"waiting for {inflight} request(s) on {profile} to finish")
        elif kind == "stopping":
            self.stop_began[str(profile)] = now
            self.line(f"stopping {profile}…")
        elif kind == "stopped":
            began = self.stop_began.pop(str(profile), None)
            took = f" in {format_duration(now - began)}" if began is not None else ""
            self.line(f"stopped {profile}{took}")
        elif kind == "starting":
            if profile == self.profile:
                self._begin(now, event.get("expected_seconds"))
            else:
                self.line(f"loading {profile} first (asked for before {self.profile})")
        elif kind == "ready" and profile == self.profile:
            self.loading = False
            seconds = event.get("load_seconds")
            took = f" in {format_duration(float(seconds))}" if seconds is not None else ""
            self.line(f"{profile} ready{took} (pid {event.get('pid')})")
            self.ready_line_printed = True
            self.settled.set()
        elif kind == "start_failed" and profile == self.profile:
            self.loading = False
            code = event.get("exit_code")
            self.line(f"loading {profile} failed"
                      + (f" (exit code {code})" if code is not None else ""))
            self.settled.set()
        elif kind == "circuit_open" and profile == self.profile:
            self.line(f"circuit open for {profile} after {event.get('failures')} failures "
                      f"in a row; local starts paused for "
                      f"{format_duration(float(event.get('cooldown') or 0))}")

    def _begin(self, began: float, expected: Any) -> None:
        self.loading = True
        self.load_began = began
        self.expected = float(expected) if isinstance(expected, int | float) else None
        self.progress()

    async def run_ticker(self) -> None:
        """Redraw (terminal) or reprint (log) the progress line while the load runs."""
        interval = PROGRESS_TTY_INTERVAL if self.tty else PROGRESS_LINE_INTERVAL
        while True:
            await trio.sleep(interval)
            if self.loading:
                self.progress()

    def progress(self) -> None:
        text = _load_text(self.profile, trio.current_time() - self.load_began, self.expected)
        if self.tty:
            self.remote.out.write(f"\r{text}\x1b[K")
            self.remote.out.flush()
            self._progress_shown = True
        else:
            self.remote.print(text)

    def line(self, text: str) -> None:
        self.end_progress()
        self.remote.print(text)

    def end_progress(self) -> None:
        """Keep the redrawn progress line, and go on below it."""
        if self._progress_shown:
            self.remote.out.write("\n")
            self._progress_shown = False


def format_event(event: Mapping[str, Any]) -> str:
    """One event as a line: local time, kind, profile, then the other fields."""
    at = event.get("at")
    when = time.strftime("%H:%M:%S", time.localtime(at)) if isinstance(at, int | float) \
        else time.strftime("%H:%M:%S")
    kind = str(event.get("kind", "?"))
    if kind == "status":  # the snapshot a new stream starts with
        active = f" {event['active']}" if event.get("active") else ""
        return f"{when} {kind:<13} {event.get('state')}{active}"
    rest = {k: v for k, v in event.items() if k not in ("seq", "at", "kind", "profile")}
    fields = " ".join(f"{k}={_field(v)}" for k, v in rest.items())
    profile = event.get("profile") or ""
    return f"{when} {kind:<13} {profile} {fields}".rstrip()


def _field(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, str):
        return shlex.quote(value) if value and " " not in value else json.dumps(value)
    return json.dumps(value)
