"""``python -m bench``: swapd versus talking to llama-server directly, in one run.

Prints a table and writes ``bench/results/bench-<time>.json`` (and ``latest.json``).
See ``bench/README.md`` for what each figure means and the last full run's numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .plan import FULL, QUICK, RESULTS, real_models
from .procs import MARKER, ROOT, OtherLoad, load_average, machine_info
from .profiling import Profiler
from .streams import streams
from .suites import Report, config_load, run_fake, run_real
from .table import render
from .warm import warm_return

SECTIONS = ("latency", "swap", "progress", "collation", "scale", "config", "warm", "streams")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark swapd against direct llama-server.")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (under a minute): fewer requests, one repeat")
    parser.add_argument("--only", metavar="SECTIONS", default=",".join(SECTIONS),
                        help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    parser.add_argument("--no-real", action="store_true",
                        help="skip everything that needs the real llama-server")
    parser.add_argument("--profile", action="store_true",
                        help="sample swapd with py-spy during the swapd side of the "
                             "latency and streaming workloads (numbers are then perturbed)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="directory for the JSON results (default bench/results)")
    return parser


def _llama_server() -> Path | None:
    sys.path.insert(0, str(ROOT))
    from tests.support.llama_build import find_llama_server

    return find_llama_server()


def _clean(value: Any) -> Any:
    """JSON without NaN (which is not JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


async def _main(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        print(f"unknown section(s): {', '.join(sorted(unknown))}; choose from "
              f"{', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    binary = None if args.no_real else _llama_server()
    if binary is None and not args.no_real:
        print("no llama-server binary: the real-server figures are skipped (build it with "
              "python tests/support/llama_build.py, or set SWAPD_LLAMA_SERVER)",
              file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    os.environ[MARKER] = uuid.uuid4().hex  # inherited by everything the run starts
    other = OtherLoad()
    sampler = asyncio.ensure_future(other.run())
    try:
        with tempfile.TemporaryDirectory(prefix="swapd-bench-") as tmp:
            profiler = Profiler(args.out) if args.profile else None
            report = Report(plan, Path(tmp), say, profiler, other)
            report.results["machine"] = machine_info(binary)
            report.results["plan"] = plan.__dict__
            if sections & {"latency", "swap", "progress", "collation", "scale"}:
                await run_fake(report, sections)
            if binary is not None and sections & {"latency", "swap", "progress"}:
                await run_real(report, sections, binary)
            if binary is not None and "warm" in sections:
                await warm_return(report, binary, real_models())
            if "config" in sections:
                config_load(report)
            if "streams" in sections:
                await streams(report)
            if profiler is not None:
                report.results["profile"] = profiler.summaries()
    finally:
        sampler.cancel()
    values = [v for _, v in other.samples]
    report.results["other_load"] = {
        "mean_cores": sum(values) / len(values) if values else None,
        "max_cores": max(values, default=None), "samples": [round(v, 2) for v in values],
        "load_average_at_end": load_average()}
    report.results["rows"] = report.rows
    report.results["elapsed_s"] = time.monotonic() - started
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(_clean(report.results), indent=1)
    path = args.out / f"bench-{plan.name}-{stamp}.json"
    path.write_text(text)
    (args.out / "latest.json").write_text(text)
    machine = report.results["machine"]
    packages = machine["packages"]
    print(f"\nswapd bench ({plan.name}), {machine['cpu_model']}, {machine['cpu_cores']} cores, "
          f"Python {machine['python']}, trio {packages['trio']}, hypercorn "
          f"{packages['hypercorn']}, httpx {packages['httpx']}, llama-server "
          f"{machine['llama_server_build'] or 'absent'}; swapd at {machine['source']['commit']}"
          f"{' + uncommitted changes' if machine['source']['swapd_uncommitted'] else ''}\n")
    print(render(report.rows))
    if values:
        print(f"\nother processes used {report.results['other_load']['mean_cores']:.2f} cores "
              f"on average (max {max(values):.2f}) of {machine['cpu_cores']} during this run")
    if profiler is not None:
        _print_profile(report.results["profile"])
    print(f"\nwrote {path} in {report.results['elapsed_s']:.0f}s")
    return 0


def _print_profile(profiles: dict[str, Any]) -> None:
    for name, summary in profiles.items():
        print(f"\npy-spy, swapd serving {name}: {summary.get('samples', 0)} samples")
        for label, pct in summary.get("layers_pct", []):
            print(f"  {pct:5.1f}%  {label}")
        print("  functions (total = on the stack, self = the sampled frame):")
        for label, pct in [t for t in summary.get("total_pct", []) if t[1] < 99.5][:15]:
            print(f"  {pct:5.1f}%  total {label}")
        for label, pct in summary.get("self_pct", [])[:10]:
            print(f"  {pct:5.1f}%  self  {label}")


def main() -> int:
    return asyncio.run(_main(_parser().parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
