"""The ``swapd`` command line: the daemon, its config check, and a client for operators.

``serve`` runs the daemon. ``check`` finds at config time what would otherwise fail at
swap time: it loads the config, prints every profile's exact argv, reports missing model
files and, when the llama-server binary is present, every flag name that binary's
``--help`` does not list (flags differ between builds; SPEC §7).

``status``, ``load``, ``unload``, ``logs`` and ``events`` talk to a running swapd over
its ``/swapd/*`` operations API (``--url``, default ``$SWAPD_URL`` or
``http://127.0.0.1:9001``; ``--key``/``$SWAPD_ADMIN_KEY`` sent as a Bearer token).
``load`` follows ``/swapd/events`` while it waits, so the operator sees the swap happen:
what is stopped, the load's percentage against that profile's last load time, and how
long it took.

Exit status: 0 all well; 1 a problem (``check`` found some; a load failed; swapd answered
with an error); 2 usage error, swapd unreachable, or the key refused; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import httpx
import trio

from swapd.config import Config, load_config, missing_model_files
from swapd.config.argv import build_argv
from swapd.config.flags import parse_help_flags, unknown_flags
from swapd.core import planner
from swapd.core.preflight import HELP_TIMEOUT
from swapd.errors import ConfigError
from swapd.estimate import (
    Estimate,
    detect_gpu_memory,
    estimate_profile,
    format_bytes,
    format_report,
    parse_gpu_memory,
)
from swapd.http.auth import load_keys

AUTO_PORT = "<auto>"


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run the command line; returns the exit status (argparse's 2 for usage errors).

    The client commands print to ``out``/``err`` (default: ``sys.stdout``/``sys.stderr``
    at the time of the call), so several can run at once, each in its own thread.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage error or --help: report its status, don't exit
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command == "check":
        return check(args.config, llama_server=args.llama_server, gpu_memory=args.gpu_memory)
    if args.command == "serve":
        return _serve(args.config)
    if args.command == "schema":
        from swapd.config.schema import schema_text

        (out or sys.stdout).write(schema_text())
        return 0
    if args.command == "import":
        from swapd.cli.migrate import run_import

        return run_import(args.kind, args.source, args.output, out=out, err=err)
    if args.command in CLIENT_COMMANDS:
        return run_client(args, out=out, err=err)
    parser.print_help(sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swapd", description="Supervise llama-server and swap models on demand.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check_cmd = commands.add_parser(
        "check", help="validate a config and show each profile's llama-server argv",
        description="Validate CONFIG: print each profile's exact llama-server argv, report "
                    "missing model files and flag names llama-server does not accept.")
    check_cmd.add_argument("config", metavar="CONFIG", help="path of the YAML config")
    check_cmd.add_argument(
        "--llama-server", metavar="PATH", type=Path,
        help="llama-server binary whose --help to check flags against "
             "(default: the config's llama_server.command)")
    check_cmd.add_argument(
        "--gpu-memory", metavar="SIZE",
        help="GPU memory to judge each profile's VRAM estimate against, e.g. 24GiB "
             "(default: memory.gpu, else the total nvidia-smi reports)")
    serve_cmd = commands.add_parser("serve", help="run the daemon")
    serve_cmd.add_argument("-c", "--config", metavar="CONFIG", required=True,
                           help="path of the YAML config")
    commands.add_parser(
        "schema", help="print the config's JSON Schema (for editors)",
        description="Print the JSON Schema of swapd's YAML config, generated from the code; "
                    "point an editor's YAML support at it for validation and completion.")
    import_cmd = commands.add_parser(
        "import", help="convert a llama-swap config or a profiles manifest",
        description="Convert another tool's config into a swapd config; what cannot be "
                    "carried over is listed on stderr and at the top of the result.")
    import_cmd.add_argument("kind", choices=["llama-swap", "manifest"],
                            help="the format of SOURCE")
    import_cmd.add_argument("source", metavar="SOURCE", help="the file to convert")
    import_cmd.add_argument("-o", "--output", metavar="OUT",
                            help="write here (never over an existing file); default: stdout")
    _client_parsers(commands)
    return parser


def _serve(config_path: str) -> int:
    from swapd.serve import run  # lazily: it pulls in the whole web stack

    return run(config_path)


def check(config_path: str, *, llama_server: Path | None = None,
          gpu_memory: str | None = None) -> int:
    """``swapd check``: print argv per profile to stdout, problems to stderr."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        _print_problems(error.problems, source=error.source)
        return 1
    problems = missing_model_files(config)
    print(f"config {config_path}: {len(config.profiles)} profile(s), "
          f"{len(config.fallbacks)} fallback(s), listening on "
          f"{config.listen.address}")
    for profile in config.profiles.values():
        aliases = f" (aliases: {', '.join(profile.aliases)})" if profile.aliases else ""
        print(f"\nprofile {profile.name}{aliases}")
        print(f"  {_display_argv(config, profile.name)}")
    if config.fallbacks:
        print()
    for fallback in config.fallbacks:
        print(f"fallback {fallback.name}: {fallback.model} at {fallback.base_url}")

    accepted, note = _accepted_flags(config, llama_server)
    if accepted is None:
        print(f"\n{note}", file=sys.stderr)
    else:
        print(f"\n{note}")
        for profile in config.profiles.values():
            problems += [f"profiles.{profile.name}.flags: {message}"
                         for message in unknown_flags(profile.flags, accepted)]
    try:
        load_keys(config.security)
    except ConfigError as error:
        problems += error.problems
    try:
        problems += _memory_report(config, gpu_memory)
    except ValueError as error:
        problems.append(f"--gpu-memory: {error}")
    if problems:
        _print_problems(problems, source=config_path)
        return 1
    print("\nok")
    return 0


def _memory_report(config: Config, gpu_memory: str | None) -> list[str]:
    """Print each profile's VRAM estimate; a problem for each that will not fit."""
    gpu = (parse_gpu_memory(gpu_memory) if gpu_memory else
           config.memory.gpu or detect_gpu_memory())
    estimates = [estimate_profile(profile) for profile in config.profiles.values()]
    text, _all_fit = format_report(estimates, gpu)
    print(f"\nVRAM estimates{f' for {format_bytes(gpu)} of GPU memory' if gpu else ''}:")
    print(text)
    if gpu is None:
        return []
    print(_together_report(config, estimates, gpu))
    return [f"profiles.{e.name}: estimated {format_bytes(e.total)} does not fit in "
            f"{format_bytes(gpu)} of GPU memory" for e in estimates if e.fits(gpu) is False]


def _together_report(config: Config, estimates: Sequence[Estimate], gpu: int) -> str:
    """Which profiles the residency planner would keep loaded side by side."""
    residency = config.residency
    if residency.mode == "count":
        cap = residency.cap or 1
        if cap == 1:
            return ("\nTogether: one model at a time (residency.mode: count, max_models: 1);"
                    " residency.mode: budget lets memory decide")
        return (f"\nTogether: up to {cap} models at once (residency.max_models), whatever "
                "their size; residency.mode: budget lets memory decide")
    memories = {g.id: g.memory for g in config.gpus} or {0: gpu}
    budgets = {i: max(0, memory - residency.reserve) for i, memory in memories.items()}
    sized = {e.name: config.profiles[e.name].memory or e.total
             for e in estimates if e.sized or config.profiles[e.name].memory}

    def plan(name: str, residents: Sequence[planner.Resident]) -> planner.Plan:
        target = planner.Target(name, sized[name], config.profiles[name].gpu)
        return planner.plan(target, residents, budgets, max_models=residency.cap)

    room = ", ".join(f"GPU {i}: {format_bytes(b)}" for i, b in budgets.items())
    lines = [f"\nTogether (residency.mode: budget; for models: {room}):"]
    for name, size in sized.items():
        alone = plan(name, [])
        if not isinstance(alone, planner.Load):
            lines.append(f"  {name}: does not fit at all")
            continue
        resident = planner.Resident(name, alone.usage)
        beside = [other for other in sized
                  if other != name and _loads_as_is(plan(other, [resident]))]
        lines.append(f"  {name} ({format_bytes(size)}): "
                     + (f"fits beside {', '.join(beside)}" if beside else "fits only alone"))
    return "\n".join(lines)


def _loads_as_is(plan: planner.Plan) -> bool:
    return isinstance(plan, planner.Load) and not plan.evict


def _print_problems(problems: Sequence[str], *, source: str) -> None:
    print(f"{source}: {len(problems)} problem(s):", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def _display_argv(config: Config, name: str) -> str:
    """The profile's argv as a shell-quoted line, ``<auto>`` standing for an auto port."""
    port = config.llama_server.port
    argv = build_argv(config, config.profiles[name], port or 0)
    words = [shlex.quote(word) for word in argv]
    if port is None:
        words[argv.index("--port") + 1] = AUTO_PORT
    return " ".join(words)


def _accepted_flags(config: Config, binary: Path | None) -> tuple[frozenset[str] | None, str]:
    """The flag spellings the llama-server build accepts, and a line saying what was done.

    Runs ``<command> --help`` once (the config's whole command, so wrappers such as
    ``[env, X=1, llama-server]`` work), or ``<binary> --help`` when given. Returns None
    (and why) when there is no binary, or its help could not be read.
    """
    command = list(config.llama_server.command)
    if binary is not None:
        command = [str(binary)]
    found = shutil.which(command[0])
    if found is None:
        spaced = "; a command is one program, not split on spaces: use a list" \
            if " " in command[0] else ""
        return None, (f"llama-server not found; flag names not checked "
                      f"(looked for {command[0]!r}{spaced})")
    try:
        result = subprocess.run(
            [found, *command[1:], "--help"], capture_output=True, text=True,
            errors="replace", timeout=HELP_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"could not run {found} --help ({error}); flag names not checked"
    accepted = parse_help_flags(result.stdout + "\n" + result.stderr)
    if not accepted:
        return None, (f"{found} --help exited with code {result.returncode} and listed no "
                      "flags; flag names not checked")
    return accepted, f"flag names checked against {found} --help ({len(accepted)} spellings)"


# --- the operator client: status, load, unload, logs, events -------------------------

DEFAULT_URL = "http://127.0.0.1:9001"

CLIENT_COMMANDS = ("status", "load", "unload", "logs", "events")

CONNECT_TIMEOUT = 5.0
"""Seconds to reach swapd; waits after that (a load, a stream) are unbounded."""

PROGRESS_TTY_INTERVAL = 0.2
"""Seconds between redraws of the load progress line on a terminal."""

PROGRESS_LINE_INTERVAL = 2.0
"""Seconds between progress lines when stdout is not a terminal (a log, a pipe)."""

READY_EVENT_GRACE = 1.0
"""After the load answered, how long the events stream may take to deliver ``ready``."""

_SERVICE_HINT = "is it running? (systemctl status swapd)"


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


class ClientError(Exception):
    """A client command cannot go on: ``message`` for stderr, ``exit_status`` to exit."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@attrs.define
class Remote:
    """A running swapd as the client sees it: where it is, the key, and where to print."""

    url: str
    key: str | None
    out: TextIO
    err: TextIO

    def client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.AsyncClient(
            base_url=self.url, headers=headers,
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT))

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    async def get_json(self, client: httpx.AsyncClient, path: str) -> dict[str, Any]:
        response = await client.get(path)
        self.check(response)
        body = response.json()
        if not isinstance(body, dict):
            raise ClientError(f"swapd at {self.url} answered {path} with {body!r}")
        return body

    def check(self, response: httpx.Response) -> None:
        """Raise ``ClientError`` for a refused key (2) or any other error answer (1)."""
        if response.is_success:
            return
        message = error_message(response)
        if response.status_code in (401, 403):
            hint = ("the key was refused" if self.key else
                    "swapd requires a key: pass --key or set SWAPD_ADMIN_KEY")
            raise ClientError(f"swapd at {self.url} refused {response.request.url.path} "
                              f"({response.status_code}: {message}); {hint}", 2)
        if response.status_code == 404 and not _is_api_error(response):
            raise ClientError(f"{self.url} has no {response.request.url.path} (404); is it "
                              "swapd, and is --url right?", 2)
        raise ClientError(message)


def _is_api_error(response: httpx.Response) -> bool:
    """Whether an error answer is swapd's own (OpenAI-shaped JSON), not a missing route."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict)


def error_message(response: httpx.Response) -> str:
    """The message of an error answer: OpenAI-shaped, Ollama-shaped, or the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
    text = response.text.strip()
    return text[:1000] if text else f"HTTP {response.status_code} {response.reason_phrase}"


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


# --- status ---------------------------------------------------------------------------

async def _status(remote: Remote, args: argparse.Namespace) -> int:
    async with remote.client() as client:
        status = await remote.get_json(client, "/swapd/status")
    if args.json:
        remote.print(json.dumps(status, indent=2, sort_keys=True))
    else:
        for line in format_status(status, url=remote.url):
            remote.print(line)
    return 0


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


# --- load -----------------------------------------------------------------------------

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


async def _follow_events(client: httpx.AsyncClient, handle: Callable[[dict[str, Any]], None],
                         *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
    """Feed ``/swapd/events`` to ``handle``; started once the stream is open. Best effort:
    progress is a nicety, so a server without the stream just shows none."""
    started = False
    try:
        async with client.stream("GET", "/swapd/events") as response:
            if response.is_success:
                async for event in _sse_data(response):
                    if not started:  # the first event is the snapshot: we are subscribed
                        task_status.started()
                        started = True
                    if isinstance(event, dict):
                        handle(event)
    except (httpx.HTTPError, ValueError):
        pass
    finally:
        if not started:
            task_status.started()


async def _sse_data(response: httpx.Response) -> AsyncIterator[Any]:
    """The decoded ``data:`` payloads of an SSE stream (comments skipped)."""
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            yield json.loads(line[5:].strip())


# --- unload, logs, events -------------------------------------------------------------

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
