"""What Ollama's API costs over the OpenAI route: swapd's CPU per streamed token.

``/v1/chat/completions`` relays the child's bytes as they are; ``/api/chat`` decodes each
SSE event and writes an NDJSON line (``swapd/http/ollama.py``). Both run here against the
paced stand-in (``bench/paced.py``) in burst mode, the same streams on each route, and
swapd's own CPU time (from ``/proc``) is divided by the tokens it delivered::

    python -m bench.ollama [--streams 16] [--tokens 400] [--rounds 3]

Linux only (``/proc/PID/stat``). Prints one row per route and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from bench.streams import PACED, paced_config

HOST = "127.0.0.1"
ROUTES = ("/v1/chat/completions", "/api/chat")
START_TIMEOUT = 30.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def body(route: str, tokens: int) -> dict[str, object]:
    messages = [{"role": "user", "content": "hi"}]
    if route == "/api/chat":
        return {"model": "paced", "messages": messages, "stream": True,
                "options": {"num_predict": tokens}}
    return {"model": "paced", "messages": messages, "stream": True, "max_tokens": tokens}


async def one_stream(client: httpx.AsyncClient, route: str, tokens: int) -> int:
    """Tokens this stream delivered (content-bearing lines)."""
    count = 0
    async with client.stream("POST", route, json=body(route, tokens)) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if route == "/api/chat":
                count += bool(line) and '"content":"' in line and '"done":false' in line
            else:
                count += line.startswith("data: {") and '"content":"' in line
    return count


async def measure(url: str, pid: int, route: str, streams: int, tokens: int) -> tuple[int,
                                                                                      float]:
    delivered = [0]
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await one_stream(client, route, 4)  # warm: the model is loaded, paths are hot
        before = cpu_seconds(pid)

        async def run() -> None:
            count = await one_stream(client, route, tokens)  # then add: tasks interleave
            delivered[0] += count

        async with trio.open_nursery() as nursery:
            for _ in range(streams):
                nursery.start_soon(run)
        return delivered[0], cpu_seconds(pid) - before


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ollama-") as tmp:
        work = Path(tmp)
        port = free_port()
        config = paced_config(work)
        config["profiles"]["paced"]["flags"] = {"paced-interval-ms": 0}
        config.update(listen=f"{HOST}:{port}", state_dir=str(work / "state"))
        (work / "swapd.yaml").write_text(json.dumps(config))
        daemon = subprocess.Popen([sys.executable, "-m", "swapd", "serve", "--config",
                                   str(work / "swapd.yaml")], stderr=subprocess.DEVNULL)
        try:
            url = f"http://{HOST}:{port}"
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    httpx.get(url + "/health", timeout=1)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise SystemExit("swapd did not start") from None
                    time.sleep(0.1)
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for route in ROUTES:
                    tokens, cpu = trio.run(measure, url, daemon.pid, route, args.streams,
                                           args.tokens)
                    if tokens:
                        per = cpu / tokens * 1e6
                        best[route] = min(best.get(route, per), per)
            print(f"swapd CPU per streamed token, {args.streams} streams x {args.tokens} "
                  f"tokens, burst, best of {args.rounds} (stand-in: {PACED.name}):")
            for route in ROUTES:
                print(f"  {route:22} {best[route]:7.1f} us")
            print(f"  /api/chat / OpenAI     {best[ROUTES[1]] / best[ROUTES[0]]:7.2f}x")
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)


if __name__ == "__main__":
    main()
