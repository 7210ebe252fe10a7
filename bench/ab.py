"""``python -m bench.ab DIR...``: compare swapd checkouts by swapd's own CPU time.

For trying a hot-path change in a scratch copy of the repository before proposing it::

    cp -r . /tmp/try && $EDITOR /tmp/try/swapd/http/proxy.py
    python -m bench.ab . /tmp/try --rounds 3

Each checkout's swapd runs in turn (``python -m swapd serve`` from that directory) on
the fake llama-server; the order alternates per round. The figures are swapd's CPU
time (``/proc/PID/stat``) per request or per SSE chunk, which a busy machine disturbs
far less than latencies; median latencies are printed beside them for orientation.

``seq``: 1,500 small chat requests one after another; ``c50``: the same from 50
connections; ``burst``: one 20,000-token stream the fake writes as fast as it can (many
chunks per read); ``paced``: 10 streams of one token per millisecond (one chunk per read).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from . import workloads
from .client import chat_body
from .procs import FAKE_SERVER, MARKER, Swapd, cpu_seconds


def config(workdir: Path) -> dict[str, Any]:
    from tests.support.tiny_gguf import write_header_only

    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "fake.gguf"
    write_header_only(model)  # the fake never opens it; swapd checks it is a GGUF
    return {
        "llama_server": {"command": [sys.executable, str(FAKE_SERVER)]},
        "profiles": {
            "fast": {"model": str(model), "flags": {"fake-tokens": 20000}},
            # One token per millisecond: every chunk is its own read, nothing coalesces.
            "paced": {"model": str(model),
                      "flags": {"fake-tokens": 2000, "fake-token-delay-ms": 1}},
        },
    }


async def measure(root: Path, workdir: Path, requests: int) -> dict[str, float]:
    swapd = Swapd(config(workdir), workdir, root.name or "root", root=root)
    await swapd.start()
    out: dict[str, float] = {}
    try:
        await swapd.load("fast")
        small = chat_body("fast", max_tokens=1)
        cpu0 = cpu_seconds(swapd.pid)
        run = await workloads.sequential(swapd.port, small, requests, 50)
        out["seq_cpu_us"] = 1e6 * (cpu_seconds(swapd.pid) - cpu0) / requests
        out["seq_p50_ms"] = 1e3 * statistics.median(run.latencies)
        cpu0 = cpu_seconds(swapd.pid)
        run = await workloads.concurrent(swapd.port, small, 50, max(requests // 50, 1), 1)
        out["c50_cpu_us"] = 1e6 * (cpu_seconds(swapd.pid) - cpu0) / max(
            len(run.latencies), 1)
        out["c50_p50_ms"] = 1e3 * statistics.median(run.latencies)
        body = chat_body("fast", max_tokens=20000, stream=True)
        cpu0 = cpu_seconds(swapd.pid)
        run = await workloads.one_stream(swapd.port, body)
        out["burst_cpu_us_chunk"] = 1e6 * (cpu_seconds(swapd.pid) - cpu0) / max(
            run.events, 1)
        out["burst_chunks_s"] = run.events / run.wall if run.wall else 0.0
        await swapd.load("paced")
        body = chat_body("paced", max_tokens=2000, stream=True)
        cpu0 = cpu_seconds(swapd.pid)
        run = await workloads.concurrent(swapd.port, body, 10, 1, 0, stream=True)
        out["paced_cpu_us_chunk"] = 1e6 * (cpu_seconds(swapd.pid) - cpu0) / max(
            run.events, 1)
        out["errors"] = float(run.errors)
    finally:
        await swapd.stop()
    return out


async def _main(args: argparse.Namespace, roots: list[Path]) -> None:
    os.environ.setdefault(MARKER, uuid.uuid4().hex)
    results: dict[Path, list[dict[str, float]]] = {r: [] for r in roots}
    with tempfile.TemporaryDirectory(prefix="swapd-ab-") as tmp:
        for round_ in range(args.rounds):
            for root in roots if round_ % 2 == 0 else roots[::-1]:
                work = Path(tmp) / f"{round_}-{roots.index(root)}"
                work.mkdir()
                results[root].append(await measure(root, work, args.requests))
                print(f"round {round_ + 1} {root}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in results[root][-1].items()), flush=True)
    print("\nmedian over rounds:")
    keys = list(next(iter(results.values()))[0])
    width = max(len(str(r)) for r in roots)
    print(" " * width + "".join(f"  {k:>18}" for k in keys))
    for root, runs in results.items():
        print(f"{root!s:{width}}" + "".join(
            f"  {statistics.median(r[k] for r in runs):18.1f}" for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="repository checkouts to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()
    asyncio.run(_main(args, [Path(d).resolve() for d in args.dirs]))


if __name__ == "__main__":
    main()
