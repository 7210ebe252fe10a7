"""The operator client's commands (``status``, ``load``, ``unload``, ``logs``, ``events``):
their arguments, and each one's conversation with swapd's ``/swapd/*`` API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TextIO

import httpx
import trio

from swapd.cli.remote import ClientError, Remote, _follow_events, _sse_data, error_message
from swapd.cli.view import LoadView, format_event, format_status

_SERVICE_HINT = "is it running? (systemctl status swapd)"

DEFAULT_URL = "http://127.0.0.1:9001"


CLIENT_COMMANDS = ("status", "load", "unload", "logs", "events")


READY_EVENT_GRACE = 1.0
"""After the load answered, how long the events stream may take to deliver ``ready``."""


def _client_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument(
        "--url", default=None,
        help=f"swapd's address (default: $SWAPD_URL, else {DEFAULT_URL})")
    remote.add_argument(
        "--key", default=None,
        help="admin key, sent as 'Authorization: Bearer KEY' (default: $SWAPD_ADMIN_KEY)")

    status = commands.add_parser(
        "status", parents=[remote], help="show what a running swapd is doing",
        description="State, active model, requests in flight and waiting, circuits, the "
                    "last error with the model's output, and every profile.")
    status.add_argument("--json", action="store_true", help="print the raw status object")
    load = commands.add_parser(
        "load", parents=[remote], help="load a profile now, showing progress",
        description="Load PROFILE (a profile name or alias), swapping out the running "
                    "model once its in-flight requests are done; prints each phase while "
                    "it waits. Exits 1 with the model's exit code and output if it fails.")
    load.add_argument("profile", metavar="PROFILE", help="profile name or alias")
    unload = commands.add_parser(
        "unload", parents=[remote], help="stop the running model(s), or one by name",
        description="Stop PROFILE, or with no name every resident model but the pinned "
                    "ones, once their in-flight requests are done (after a crash: clear "
                    "the failed state). Exits 1 if it did not finish.")
    unload.add_argument("profile", metavar="PROFILE", nargs="?",
                        help="profile name or alias (default: every unpinned model)")
    logs = commands.add_parser(
        "logs", parents=[remote], help="show llama-server's recent output",
        description="The last lines llama-server wrote (every model swapd ran).")
    logs.add_argument("-n", "--lines", type=int, default=100, metavar="N",
                      help="how many lines (default: %(default)s)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new lines until interrupted")
    events = commands.add_parser(
        "events", parents=[remote], help="follow swapd's events (state changes, loads, "
                                         "failures) until interrupted")
    events.add_argument("--json", action="store_true", help="print each event as JSON")


def run_client(args: argparse.Namespace, *, out: TextIO | None = None,
               err: TextIO | None = None) -> int:
    """Run one client command in its own trio run; returns the exit status."""
    given = args.url or os.environ.get("SWAPD_URL") or DEFAULT_URL
    url = given.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    remote = Remote(url, args.key or os.environ.get("SWAPD_ADMIN_KEY") or None,
                    out if out is not None else sys.stdout,
                    err if err is not None else sys.stderr)
    command: Callable[[Remote, argparse.Namespace], Awaitable[int]] = {
        "status": _status, "load": _load, "unload": _unload, "logs": _logs,
        "events": _events}[args.command]
    try:
        return trio.run(command, remote, args)
    except BaseException as raised:  # sorted below; anything else is re-raised
        error = _only(raised)
        if isinstance(error, KeyboardInterrupt):
            if args.command == "load":
                print("\ninterrupted; the load goes on in swapd (see: swapd status)",
                      file=remote.err)
            return 130
        if isinstance(error, ClientError):
            first, *more = str(error).splitlines() or [""]
            print(f"swapd {args.command}: {first}", file=remote.err)
            for line in more:  # a failed start's output, line by line
                print(f"  | {line}", file=remote.err)
            return error.exit_status
        if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
            print(f"swapd is not reachable at {url}: {error or type(error).__name__}; "
                  f"{_SERVICE_HINT}", file=remote.err)
            return 2
        if isinstance(error, httpx.UnsupportedProtocol | httpx.InvalidURL):
            print(f"swapd {args.command}: invalid --url {given!r}: {error}",
                  file=remote.err)
            return 2
        if isinstance(error, httpx.TransportError):
            print(f"lost the connection to swapd at {url}: "
                  f"{error or type(error).__name__}; {_SERVICE_HINT}", file=remote.err)
            return 2
        raise


def _only(error: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, else ``error``."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


async def _status(remote: Remote, args: argparse.Namespace) -> int:
    async with remote.client() as client:
        status = await remote.get_json(client, "/swapd/status")
    if args.json:
        remote.print(json.dumps(status, indent=2, sort_keys=True))
    else:
        for line in format_status(status, url=remote.url):
            remote.print(line)
    return 0


async def _load(remote: Remote, args: argparse.Namespace) -> int:
    async with remote.client() as client:
        status = await remote.get_json(client, "/swapd/status")
        view = LoadView(remote, resolve_profile(status, args.profile))
        view.on_event({"kind": "status", **status})
        async with trio.open_nursery() as nursery:
            # Follow the events before asking: nothing of this load can be missed.
            await nursery.start(_follow_events, client, view.on_event)
            nursery.start_soon(view.run_ticker)
            response = await client.post("/swapd/load", json={"model": args.profile})
            # The answer can overtake the event that explains it (ready, start_failed).
            with trio.move_on_after(READY_EVENT_GRACE if view.loading else 0):
                await view.settled.wait()
            nursery.cancel_scope.cancel()
        view.end_progress()
        if response.status_code == 504:
            raise ClientError(f"{error_message(response)}; it may still be loading: "
                              "follow it with `swapd events`")
        remote.check(response)
        body = response.json()
        if not view.ready_line_printed:
            remote.print(f"{body.get('model', args.profile)} is loaded (pid {body.get('pid')})")
        return 0


def resolve_profile(status: Mapping[str, Any], name: str) -> str:
    """The profile a name means, from the status's profiles and aliases (else the name)."""
    profiles = status.get("profiles") or {}
    if name in profiles:
        return name
    for profile, info in profiles.items():
        if name in (info.get("aliases") or ()):
            return str(profile)
    return name


async def _unload(remote: Remote, args: argparse.Namespace) -> int:
    if getattr(args, "profile", None):
        async with remote.client() as client:
            response = await client.post("/swapd/unload", json={"model": args.profile})
            remote.check(response)  # 404 for no such profile, 504 if it did not finish
            answer = response.json()
            remote.print(f"unloaded {answer.get('model')} (state: {answer.get('state')})")
            return 0
    async with remote.client() as client:
        status = await remote.get_json(client, "/swapd/status")
        active = status.get("active")
        if not active and status.get("state") != "failed":
            remote.print(f"nothing is loaded (state: {status.get('state')})")
            return 0
        if status.get("inflight"):
            remote.print(f"unloading {active} once its {status['inflight']} request(s) in "
                         "flight are done…")
        response = await client.post("/swapd/unload")
        remote.check(response)  # an unload that did not finish exits 1, saying what runs
        state = response.json().get("state")
        remote.print(f"unloaded {active} (state: {state})" if active else
                     f"nothing was running; cleared the failed state (state: {state})")
        return 0


async def _logs(remote: Remote, args: argparse.Namespace) -> int:
    count = max(1, args.lines)
    async with remote.client() as client:
        if not args.follow:
            response = await client.get("/swapd/logs", params={"lines": count})
            remote.check(response)
            remote.out.write(response.text)
            remote.out.flush()
            return 0
        # Open the stream first, so no line written meanwhile is lost.
        async with client.stream("GET", "/swapd/logs/stream") as stream:
            if not stream.is_success:
                await stream.aread()
                remote.check(stream)
            response = await client.get("/swapd/logs", params={"lines": count})
            remote.check(response)
            remote.out.write(response.text)
            remote.out.flush()
            async for line in _sse_data(stream):
                remote.print(str(line))
        raise ClientError(f"swapd at {remote.url} closed the log stream; {_SERVICE_HINT}", 2)


async def _events(remote: Remote, args: argparse.Namespace) -> int:
    async with remote.client() as client, client.stream("GET", "/swapd/events") as response:
        if not response.is_success:
            await response.aread()
            remote.check(response)
        async for event in _sse_data(response):
            if args.json:
                remote.print(json.dumps(event))
            elif isinstance(event, dict):
                remote.print(format_event(event))
    raise ClientError(f"swapd at {remote.url} closed the event stream; {_SERVICE_HINT}", 2)
