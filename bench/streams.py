"""Section 9, ``streams``: many paced SSE streams, direct, through the floor relay and swapd.

On a GPU that batches, llama-server emits a token for every active stream at each decode
step, each as its own SSE chunk; the relay's cost per chunk decides how many streams it
can carry. Upstream is ``bench/paced.py`` (one process, one event loop, one timer per
step: cheap, so it is never the limit). The same workload, in the same run, goes to:

* **direct**: a stand-in the bench spawns with the argv swapd gives its own child;
* **floor**: ``bench/floor.py`` in front of that same stand-in, the cheapest trio relay
  (one task per connection, raw socket calls, no HTTP): what is physically possible here;
* **swapd**: ``python -m swapd serve`` with the stand-in as its ``paced`` profile's child;
* **llama-swap**: when ``BENCH_PEER_LLAMA_SWAP`` names its binary, with a config that runs
  the same stand-in (written here; untested where no binary was at hand).

The load generator is ``bench/streamclient.py`` in its own process. The order of the sides
rotates per repeat. Relay and stand-in CPU come from ``/proc/PID/stat`` around each run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from swapd.config import parse_config
from swapd.config.argv import build_argv

from .client import clock, fetch
from .plan import Plan
from .procs import HOST, ROOT, Swapd, cpu_seconds, free_port, kill, spawn, wait_health
from .stats import spread

PACED = ROOT / "bench" / "paced.py"
FLOOR = ROOT / "bench" / "floor.py"
PEER_ENV = "BENCH_PEER_LLAMA_SWAP"
SECTION = "9. streams"
START_TIMEOUT = 30.0
STREAM_TIMEOUT = 300.0  # seconds one stream may take (a saturated relay stretches them)


def paced_config(workdir: Path) -> dict[str, Any]:
    """swapd's config: one profile, ``paced``, whose child is the stand-in."""
    from tests.support.tiny_gguf import write_header_only

    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "paced.gguf"
    write_header_only(model)  # the stand-in never opens it; swapd checks it is a GGUF
    return {"llama_server": {"command": [sys.executable, str(PACED)]},
            "timeouts": {"start": "30s", "stop": "10s", "queue_wait": "60s"},
            "queue": {"max_waiting": 64},
            "profiles": {"paced": {"model": str(model)}}}


def llama_swap_config(workdir: Path) -> Path:
    """llama-swap's YAML for the same stand-in (``${PORT}`` is llama-swap's macro)."""
    path = workdir / "llama-swap.yaml"
    cmd = (f"{sys.executable} {PACED} --model {workdir / 'paced.gguf'} --host {HOST} "
           f"--port ${{PORT}} --alias paced")
    path.write_text(
        "healthCheckTimeout: 60\n"
        "logLevel: warn\n"
        "models:\n"
        "  paced:\n"
        f"    cmd: {json.dumps(cmd)}\n"
        f'    proxy: "http://{HOST}:${{PORT}}"\n'
        "    checkEndpoint: /health\n")
    return path


def stream_body(tokens: int, interval_ms: float) -> str:
    return json.dumps({"model": "paced", "stream": True, "max_tokens": tokens,
                       "messages": [{"role": "user", "content": "hi"}],
                       "paced_interval_ms": interval_ms})


async def wait_port(port: int, wait_timeout: float) -> None:
    """Until something accepts on ``port`` (the floor relay has no ``/health`` of its own)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(f"nothing accepts on {HOST}:{port}") from None
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return


class Side:
    """One way to reach the stand-in: its port, the relay's pid, the stand-in's pid."""

    def __init__(self, name: str, port: int, relay_pid: int | None,
                 upstream_pid: int | None) -> None:
        self.name = name
        self.port = port
        self.relay_pid = relay_pid
        self.upstream_pid = upstream_pid


async def client_run(side: Side, streams: int, body: str) -> dict[str, Any]:
    """One run of the stream client against ``side``, with the relay's and the stand-in's
    CPU over it."""
    relay0 = cpu_seconds(side.relay_pid) if side.relay_pid else None
    up0 = cpu_seconds(side.upstream_pid) if side.upstream_pid else None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.streamclient", "--port", str(side.port),
        "--streams", str(streams), "--body", body, "--timeout", str(STREAM_TIMEOUT),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"stream client failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    wall = result["wall_s"]
    if relay0 is not None and side.relay_pid:
        result["relay_cpu_s"] = cpu_seconds(side.relay_pid) - relay0
        result["relay_cores"] = result["relay_cpu_s"] / wall
    if up0 is not None and side.upstream_pid:
        result["upstream_cpu_s"] = cpu_seconds(side.upstream_pid) - up0
    return result


def _per_event_us(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    if not runs or any(key not in r for r in runs):
        return None
    events = sum(r["events"] for r in runs)
    return 1e6 * sum(r[key] for r in runs) / events if events else None


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats (rates, gap percentiles); CPU per chunk pooled over repeats."""
    return {
        "events_per_s": spread([r["events_per_s"] for r in runs]),
        "gap_p50_ms": spread([r["gap_ms"]["p50"] for r in runs])["p50"],
        "gap_p99_ms": spread([r["gap_ms"]["p99"] for r in runs])["p50"],
        "gap_p999_ms": spread([r["gap_ms"]["p99.9"] for r in runs])["p50"],
        "gap_max_ms": max((r["gap_ms"]["max"] or 0.0) for r in runs),
        "first_event_p99_ms": spread([r["first_event_ms"]["p99"] for r in runs])["p50"],
        "errors": sum(r["errors"] for r in runs),
        "error_examples": [e for r in runs for e in r["error_examples"]][:5],
        "relay_cores": (spread([r["relay_cores"] for r in runs])["p50"]
                        if all("relay_cores" in r for r in runs) else None),
        "relay_cpu_us_per_chunk": _per_event_us(runs, "relay_cpu_s"),
        "client_cpu_us_per_chunk": _per_event_us(runs, "client_cpu_s"),
        "client_cores": spread([r["client_cpu_s"] / r["wall_s"] for r in runs])["p50"],
        "stand_in_cpu_us_per_chunk": _per_event_us(runs, "upstream_cpu_s"),
        "runs": list(runs),
    }


class LlamaSwap:
    """llama-swap on the stand-in, if ``BENCH_PEER_LLAMA_SWAP`` names its binary."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.config = llama_swap_config(workdir)
        self.log = workdir / "llama-swap.log"
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                [binary, "--config", str(self.config), "--listen", f"{HOST}:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    async def ready(self) -> None:
        await wait_port(self.port, START_TIMEOUT)
        body = json.dumps({"model": "paced", "max_tokens": 1,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        answer = await fetch(HOST, self.port, "POST", "/v1/chat/completions", body,
                             request_timeout=START_TIMEOUT)  # loads the model
        if answer.status != 200:
            raise RuntimeError(f"llama-swap answered {answer.status}; see {self.log}")


@contextlib.asynccontextmanager
async def _processes(report: Any) -> AsyncIterator[list[Side]]:
    """The stand-in, the floor relay, swapd (and llama-swap), all up; stopped after."""
    workdir: Path = report.workdir / "streams"
    raw = paced_config(workdir)
    config = parse_config(json.dumps(raw))
    port = free_port()
    started: list[subprocess.Popen[bytes]] = []
    swapd = Swapd(raw, workdir, "streams")
    try:
        upstream = spawn(build_argv(config, config.profiles["paced"], port))
        started.append(upstream)
        floor_port = free_port()
        floor = spawn([sys.executable, str(FLOOR), "--port", str(floor_port),
                       "--upstream-port", str(port)])
        started.append(floor)
        await swapd.start()
        status = await swapd.load("paced")
        await wait_health(port, START_TIMEOUT, interval=0.005)
        await wait_port(floor_port, START_TIMEOUT)
        sides = [Side("direct", port, None, upstream.pid),
                 Side("floor", floor_port, floor.pid, upstream.pid),
                 Side("swapd", swapd.port, swapd.pid, status.get("pid"))]
        peer = os.environ.get(PEER_ENV)
        if peer:
            llama_swap = LlamaSwap(peer, workdir)
            started.append(llama_swap.popen)
            await llama_swap.ready()
            sides.append(Side("llama-swap", llama_swap.port, llama_swap.popen.pid, None))
        yield sides
    finally:
        await swapd.stop()
        for popen in started:
            await kill(popen)


def workloads(plan: Plan) -> list[tuple[str, int, str]]:
    """(key, streams, body) of each workload of the section."""
    rate = 1000 / plan.paced_interval_ms
    out = [(f"{n} paced streams x {rate:g}/s", n,
            stream_body(plan.paced_tokens, plan.paced_interval_ms)) for n in plan.paced_streams]
    out.append(("1 burst stream", 1, stream_body(plan.burst_tokens, 0)))
    many_rate = 1000 / plan.many_interval_ms
    out.append((f"{plan.many_streams} streams x {many_rate:g}/s", plan.many_streams,
                stream_body(plan.many_tokens, plan.many_interval_ms)))
    return out


async def streams(report: Any) -> None:
    plan: Plan = report.plan
    results: dict[str, Any] = {"interval_ms": plan.paced_interval_ms,
                               "tokens": plan.paced_tokens, "workloads": {}}
    async with _processes(report) as sides:
        for side in sides:  # warm up: imports, first connections, the child's first stream
            await client_run(side, 4, stream_body(5, 1))
        for key, count, body in workloads(plan):
            report.say(f"streams: {key}, {len(sides)} sides x {plan.repeats}")
            t0 = clock()
            runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sides}
            for repeat in range(plan.repeats):
                shift = repeat % len(sides)
                for side in sides[shift:] + sides[:shift]:
                    result = await client_run(side, count, body)
                    if result["errors"]:
                        report.say(f"  {key} {side.name}: {result['errors']} error(s), e.g. "
                                   f"{result['error_examples'][0]}")
                    runs[side.name].append(result)
            summary = {name: summarize(side_runs) for name, side_runs in runs.items()}
            results["workloads"][key] = summary
            _rows(report, key, count, summary, (t0, clock()))
    report.results["streams"] = results


def _rows(report: Any, key: str, count: int, s: dict[str, Any],
          window: tuple[float, float]) -> None:
    direct, floor, swapd = s["direct"], s["floor"], s["swapd"]
    peer = s.get("llama-swap")

    def cols(field: str) -> dict[str, Any]:
        return {"direct": direct[field], "swapd": swapd[field], "floor": floor[field],
                "peer": peer[field] if peer else None}

    def relay_cols(field: str) -> dict[str, Any]:
        return {**cols(field), "direct": None}

    rate = {k: (v["p50"] if v else None) for k, v in cols("events_per_s").items()}
    d, sw = rate["direct"], rate["swapd"]
    if "paced" in key:
        report.row(SECTION, f"{key}: chunks/s", "1/s", **rate, ratio=True,
                   target=">= 97% of direct", met=sw >= 0.97 * d, window=window)
        report.row(SECTION, f"{count} paced: gap p50", "ms", **cols("gap_p50_ms"))
        gap = cols("gap_p99_ms")
        added, floor_added = gap["swapd"] - gap["direct"], gap["floor"] - gap["direct"]
        report.row(SECTION, f"{count} paced: gap p99 (diff = added)", "ms", **gap,
                   target="added <= floor's + 3 ms", met=added <= floor_added + 3)
        report.row(SECTION, f"{count} paced: relay CPU", "cores", **relay_cols("relay_cores"))
        _cpu_row(report, f"{count} paced: relay CPU per chunk", relay_cols(
            "relay_cpu_us_per_chunk"), target=True)
        report.row(SECTION, f"{count} paced: client CPU per chunk", "us",
                   **cols("client_cpu_us_per_chunk"))
        report.row(SECTION, f"{count} paced: stand-in CPU per chunk", "us",
                   **cols("stand_in_cpu_us_per_chunk"))
    elif "burst" in key:
        report.row(SECTION, f"{key}: chunks/s", "1/s", **rate, ratio=True,
                   target=">= 90% of direct", met=sw >= 0.9 * d, window=window)
        _cpu_row(report, f"{key}: relay CPU per chunk", relay_cols("relay_cpu_us_per_chunk"),
                 target=False)
    else:
        errors = {k: (float(v) if v is not None else None) for k, v in cols("errors").items()}
        report.row(SECTION, f"{key}: errors", "", **errors, target="0",
                   met=swapd["errors"] == 0, window=window)
        report.row(SECTION, f"{count} streams: chunks/s", "1/s", **rate, ratio=True)
        report.row(SECTION, f"{count} streams: first chunk p99", "ms",
                   **cols("first_event_p99_ms"))
        _cpu_row(report, f"{count} streams: relay CPU per chunk",
                 relay_cols("relay_cpu_us_per_chunk"), target=False)


def _cpu_row(report: Any, metric: str, values: dict[str, Any], *, target: bool) -> None:
    """CPU per chunk; diff = swapd's as a multiple of the floor relay's."""
    f, s = values["floor"], values["swapd"]
    times = s / f if f and s is not None else None
    report.row(SECTION, metric, "us", **values, diff=times, times=True,
               target="<= 1.3x floor's" if target else "",
               met=(times is not None and times <= 1.3) if target else None)
