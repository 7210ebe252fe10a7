"""``--profile``: sample swapd with py-spy while it serves a workload, then summarize.

py-spy attaches to the running ``python -m swapd serve`` (no code change, no restart)
and writes collapsed stacks (``--format raw``); :func:`summarize` turns them into the
functions that hold the CPU: *self* (the sampled frame itself) and *total* (anywhere on
the stack), each as a share of the samples. Numbers from a profiled run are perturbed
(py-spy reads the process's memory at every sample); profile separately from the run
whose numbers you report.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

# Frames where a thread waits rather than works (py-spy cannot always tell).
_IDLE = frozenset({"trio/_core/_thread_cache.py:WorkerThread._work"})
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


class Profiler:
    def __init__(self, out_dir: Path, rate: int = 250) -> None:
        self.out_dir = out_dir
        self.rate = rate
        self.files: dict[str, list[Path]] = collections.defaultdict(list)
        beside = Path(sys.executable).with_name("py-spy")  # a venv not on PATH
        exe = str(beside) if beside.exists() else shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self.exe = exe

    @contextlib.asynccontextmanager
    async def record(self, pid: int, name: str) -> AsyncIterator[None]:
        path = self.out_dir / f"pyspy-{name}-{len(self.files[name])}.txt"
        proc = await asyncio.create_subprocess_exec(
            self.exe, "record", "--pid", str(pid), "--rate", str(self.rate),
            "--format", "raw", "--output", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        await asyncio.sleep(0.3)  # attach before the workload starts
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            if path.exists():
                self.files[name].append(path)

    def summaries(self, top: int = 30) -> dict[str, Any]:
        out = {}
        for name, paths in self.files.items():
            out[name] = summarize(paths, top)
            (self.out_dir / f"pyspy-{name}-summary.json").write_text(
                json.dumps(out[name], indent=1))
        return out


def _label(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``module.py:func`` (package-relative)."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/", "/bench/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{match.group('func')}"


LAYERS = (
    # (label prefix, layer): the innermost frame that matches decides a sample's layer.
    ("httpx/", "upstream client (httpx, httpcore)"),
    ("httpcore/", "upstream client (httpx, httpcore)"),
    ("swapd/net/upstream.py", "upstream client (swapd)"),
    ("hypercorn/protocol/http_stream.py:HTTPStream.app_send", "hypercorn: sending to client"),
    ("hypercorn/trio/tcp_server.py:TCPServer.protocol_send", "hypercorn: sending to client"),
    ("hypercorn/", "hypercorn: reading, parsing, tasks"),
    ("prometheus_client/", "metrics"),
    ("swapd/core/supervisor.py", "supervisor"),
    ("swapd/core/process.py", "child output, process"),
    ("quart", "quart"),
    ("swapd/", "swapd proxy and app code"),
)


def _layer(frames: list[str]) -> str:
    # Only the running task's frames count: below trio's run loop, not the frames that
    # started the loop (``swapd/serve.py:run`` is on every stack).
    loop = [i for i, label in enumerate(frames) if label == "trio/_core/_run.py:unrolled_run"]
    task = frames[loop[-1] + 1:] if loop else []
    for label in reversed(task):
        for prefix, layer in LAYERS:
            if label.startswith(prefix):
                return layer
    if frames and frames[-1].startswith("trio/_core/_io_epoll.py"):
        return "trio: epoll_wait"
    return "trio: scheduler, other"


def summarize(paths: list[Path], top: int = 30) -> dict[str, Any]:
    """Self and total sample shares per function, over every stack in ``paths``."""
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    module_counts: collections.Counter[str] = collections.Counter()
    layer_counts: collections.Counter[str] = collections.Counter()
    samples = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_label(f) for f in stack.split(";") if f]
            if not frames or frames[-1] in _IDLE:
                continue
            samples += count
            self_counts[frames[-1]] += count
            for label in set(frames):
                total_counts[label] += count
            module_counts[_package(frames[-1])] += count
            layer_counts[_layer(frames)] += count
    if not samples:
        return {"samples": 0}

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / samples, 1)) for k, v in counter.most_common(top)]

    return {"samples": samples, "layers_pct": share(layer_counts),
            "self_pct": share(self_counts),
            "total_pct": share(total_counts), "self_pct_by_package": share(module_counts)}


def _package(label: str) -> str:
    file = label.split(":", 1)[0]
    if "/" in file:
        return file.split("/", 1)[0]
    return file.removesuffix(".py")  # the standard library
