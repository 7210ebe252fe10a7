"""``swapd``'s argument parser and dispatch: each command's code lives in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from swapd.cli.check import check
from swapd.cli.commands import CLIENT_COMMANDS, _client_parsers, run_client


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
