"""``python -m bench.residency``: a RAG client's traffic, one model at a time vs. the budget.

The example config's shape: a big chat profile and a small embedding profile on one
24 GiB GPU. A RAG client interleaves them (embed the question, chat about it, embed
the next...). With ``residency.max_models: 1`` every switch is a swap; with
``residency.mode: budget`` both stay loaded after the first two loads. Both runs send
the same requests in the same order, one at a time, and the table shows swaps, total
time and per-request latency side by side.

Two setups, in one run:

* ``fake``: the fake llama-server with load times like a real GPU's (chat 3 s, embedding
  0.5 s), on a simulated 24 GiB GPU (the fake's ``--fake-gpu-*`` flags: a load past the
  budget would die of OOM, as on a real card), 17.5 and 0.7 GiB;
* ``real``: the real llama-server on two tiny generated models (a chat and an embedding
  profile), with ``memory:`` sizes that make the budget bind as it would on a GPU.

Numbers are printed and written to ``bench/results/residency-latest.json``; nothing is
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .client import fetch
from .plan import RESULTS
from .procs import HOST, ROOT, Swapd
from .stats import percentile

FAKE_SERVER = ROOT / "tests" / "support" / "fake_llama_server.py"
GiB_MIB = 1024


def _profiles(model: Path, real: bool, gpu_file: Path) -> dict[str, Any]:
    if real:
        return {
            "chat": {"model": str(model.parent / "chat.gguf"), "memory": "17.5GiB",
                     "flags": {"ctx-size": 1024, "parallel": 1}},
            "embed": {"model": str(model.parent / "embed.gguf"), "memory": "700MiB",
                      "flags": {"embedding": True, "pooling": "mean", "ctx-size": 512,
                                "parallel": 1}},
        }
    gpu = {"fake-gpu-file": str(gpu_file), "fake-gpu-mib": 24 * GiB_MIB}
    return {
        "chat": {"model": str(model), "flags": {
            "fake-load-ms": 3000, "fake-tokens": 4, "fake-vram-mib": 17.5 * GiB_MIB, **gpu}},
        "embed": {"model": str(model), "flags": {
            "fake-load-ms": 500, "fake-tokens": 1, "fake-vram-mib": 700, **gpu}},
    }


def _config(workdir: Path, *, real: bool, binary: Path | None, budget: bool) -> dict[str, Any]:
    command = [str(binary)] if real and binary else [sys.executable, str(FAKE_SERVER)]
    residency: dict[str, Any] = ({"mode": "budget", "reserve": "512MiB"} if budget
                                 else {"max_models": 1})
    config: dict[str, Any] = {
        "llama_server": {"command": command},
        "timeouts": {"start": "60s", "queue_wait": "120s"},
        "gpus": [{"id": 0, "memory": "24GiB"}],
        "residency": residency,
        "profiles": _profiles(workdir / "fake.gguf", real,
                              workdir / f"gpu-{'budget' if budget else 'one'}"),
    }
    if not real:  # the fake sizes itself; swapd learns it from its buffer lines
        config["profiles"]["chat"]["memory"] = "17.5GiB"
        config["profiles"]["embed"]["memory"] = "700MiB"
    return config


async def _traffic(swapd: Swapd, requests: int) -> dict[str, Any]:
    chat = json.dumps({"model": "chat", "max_tokens": 4, "messages": [
        {"role": "user", "content": "what does the document say?"}]}).encode()
    embed = json.dumps({"model": "embed", "input": "a chunk of the document"}).encode()
    latencies: dict[str, list[float]] = {"chat": [], "embed": []}
    began = time.monotonic()
    for index in range(requests):
        kind = "embed" if index % 2 == 0 else "chat"
        path = "/v1/embeddings" if kind == "embed" else "/v1/chat/completions"
        start = time.monotonic()
        answer = await fetch(HOST, swapd.port, "POST", path, embed if kind == "embed" else chat,
                             request_timeout=180.0)
        if answer.status != 200:
            raise RuntimeError(f"{kind} answered {answer.status}: {answer.body[:300]!r}")
        latencies[kind].append(time.monotonic() - start)
    total = time.monotonic() - began
    status = await swapd.status()
    every = latencies["chat"] + latencies["embed"]
    return {"requests": requests, "total_s": round(total, 3), "swaps": status.get("swaps"),
            "p50_ms": round(1000 * percentile(every, 50), 2),
            "p99_ms": round(1000 * percentile(every, 99), 2),
            "chat_p50_ms": round(1000 * percentile(latencies["chat"], 50), 2),
            "embed_p50_ms": round(1000 * percentile(latencies["embed"], 50), 2)}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.support.llama_build import find_llama_server
    from tests.support.tiny_gguf import write_header_only, write_tiny_llama

    binary = None if args.no_real else find_llama_server()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="swapd-bench-res-") as tmp:
        workdir = Path(tmp)
        write_header_only(workdir / "fake.gguf")
        write_tiny_llama(workdir / "chat.gguf", seed=1, name="tiny-chat", context_length=1024)
        write_tiny_llama(workdir / "embed.gguf", seed=2, name="tiny-embed",
                         context_length=1024)
        setups = ["fake"] + (["real"] if binary else [])
        for setup in setups:
            for budget in (False, True):
                name = f"{setup}-{'budget' if budget else 'one-at-a-time'}"
                swapd = Swapd(_config(workdir, real=setup == "real", binary=binary,
                                      budget=budget), workdir, name)
                await swapd.start()
                try:
                    results[name] = await _traffic(swapd, args.requests)
                finally:
                    await swapd.stop()
                print(f"{name:28} {json.dumps(results[name])}", flush=True)
    return results


def _table(results: dict[str, Any]) -> str:
    lines = ["| setup | residency | swaps | total s | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        setup, _, mode = name.partition("-")
        lines.append(f"| {setup} | {mode} | {r['swaps']} | {r['total_s']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.residency", description=__doc__)
    parser.add_argument("--requests", type=int, default=200,
                        help="interleaved embedding and chat requests (default 200)")
    parser.add_argument("--no-real", action="store_true", help="the fake llama-server only")
    args = parser.parse_args()
    results = asyncio.run(_run(args))
    print(_table(results))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "residency-latest.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
