"""The ``swapd`` command line: ``swapd serve`` runs the daemon, ``swapd check`` validates.

``check`` finds at config time what would otherwise fail at swap time: it loads the
config, prints every profile's exact argv, reports missing model files and, when the
llama-server binary is present, every flag name that binary's ``--help`` does not list
(flags differ between builds; SPEC §7). Exit status: 0 all well, 1 any problem (all of
them on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from swapd.config import Config, load_config, missing_model_files
from swapd.errors import ConfigError
from swapd.flags import build_argv, parse_help_flags, unknown_flags

HELP_TIMEOUT = 30.0
"""Seconds ``llama-server --help`` may take; it may probe GPU backends before printing."""

AUTO_PORT = "<auto>"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse's 2 for usage errors)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage error or --help: report its status, don't exit
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command == "check":
        return check(args.config, llama_server=args.llama_server)
    if args.command == "serve":
        return _serve(args.config)
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
    serve_cmd = commands.add_parser("serve", help="run the daemon")
    serve_cmd.add_argument("-c", "--config", metavar="CONFIG", required=True,
                           help="path of the YAML config")
    return parser


def _serve(config_path: str) -> int:
    from swapd.serve import run  # lazily: it pulls in the whole web stack

    return run(config_path)


def check(config_path: str, *, llama_server: Path | None = None) -> int:
    """``swapd check``: print argv per profile to stdout, problems to stderr."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        _print_problems(error.problems, source=error.source)
        return 1
    problems = missing_model_files(config)
    print(f"config {config_path}: {len(config.profiles)} profile(s), "
          f"{len(config.fallbacks)} fallback(s), listening on "
          f"{_host_port(config.listen.host, config.listen.port)}")
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
    if problems:
        _print_problems(problems, source=config_path)
        return 1
    print("\nok")
    return 0


def _print_problems(problems: Sequence[str], *, source: str) -> None:
    print(f"{source}: {len(problems)} problem(s):", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
