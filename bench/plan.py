"""What the benchmark runs against: sizes of a run, models on disk, swapd configs.

Generated models are cached under ``bench/results/models`` (they are a function of their
arguments, so a cached file is the same file); the real ``llama-server`` is the one the
tests build (``tests/support/llama_build.py``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from .procs import FAKE_SERVER, ROOT

RESULTS = ROOT / "bench" / "results"
MODELS = RESULTS / "models"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of everything one run does (``--quick`` or full)."""

    name: str
    repeats: int
    seq_requests: int
    warmup: int
    clients: int
    per_client: int
    stream_tokens: int  # one long fake stream
    streams: int  # concurrent fake streams ...
    stream_tokens_each: int  # ... of this many tokens
    real_stream_tokens: int
    swaps: int
    big_swaps: int
    progress_swaps: int
    burst: int
    collation_repeats: int
    held_clients: int
    hold_seconds: float
    profiles_for_config: int
    config_repeats: int
    wrk_seconds: int
    wrk_connections: tuple[int, ...]
    paced_streams: tuple[int, ...]  # section 9: concurrent paced streams ...
    paced_interval_ms: float  # ... one token each per this many ms ...
    paced_tokens: int  # ... this many tokens each
    burst_tokens: int  # one stream written as fast as the socket takes it
    many_streams: int  # this many streams at once ...
    many_interval_ms: float  # ... one token per this many ms ...
    many_tokens: int  # ... this many tokens each


FULL = Plan(name="full", repeats=3, seq_requests=300, warmup=30, clients=50, per_client=20,
            stream_tokens=20000, streams=50, stream_tokens_each=1000,
            real_stream_tokens=400, swaps=10, big_swaps=10, progress_swaps=6, burst=12,
            collation_repeats=3, held_clients=200, hold_seconds=15.0,
            profiles_for_config=1000, config_repeats=3, wrk_seconds=4, wrk_connections=(1, 50),
            paced_streams=(16, 64), paced_interval_ms=10, paced_tokens=600, burst_tokens=100000,
            many_streams=200, many_interval_ms=100, many_tokens=50)

QUICK = Plan(name="quick", repeats=1, seq_requests=100, warmup=10, clients=50, per_client=4,
             stream_tokens=5000, streams=50, stream_tokens_each=200,
             real_stream_tokens=100, swaps=4, big_swaps=2, progress_swaps=2, burst=12,
             collation_repeats=1, held_clients=200, hold_seconds=2.0,
             profiles_for_config=1000, config_repeats=1, wrk_seconds=1, wrk_connections=(),
             paced_streams=(16, 64), paced_interval_ms=10, paced_tokens=150, burst_tokens=30000,
             many_streams=200, many_interval_ms=100, many_tokens=20)

FAKE_SWAP_LOAD_MS = 200
COLLATION_LOAD_MS = 300
HELD_TOKEN_DELAY_MS = 100
BIG = {"n_embd": 1024, "n_layers": 5, "n_head": 16, "n_head_kv": 16}  # about 215 MB


def fake_config(workdir: Path, plan: Plan) -> dict[str, Any]:
    """Profiles on the fake llama-server: a fast one, two for swaps, three for collation,
    one paced for the held streams."""
    from tests.support.tiny_gguf import write_header_only

    workdir.mkdir(parents=True, exist_ok=True)
    write_header_only(workdir / "fake.gguf")  # the fake never opens it; swapd checks it
    model = str(workdir / "fake.gguf")
    held_tokens = int(plan.hold_seconds * 1000 / HELD_TOKEN_DELAY_MS) + 1

    def profile(**flags: Any) -> dict[str, Any]:
        return {"model": model, "flags": flags}

    return {
        "llama_server": {"command": [sys.executable, str(FAKE_SERVER)]},
        "timeouts": {"start": "30s", "stop": "10s", "queue_wait": "60s"},
        # The collation burst must all fit in the queue (default 10).
        "queue": {"max_waiting": 64},
        "profiles": {
            "fast": profile(**{"fake-tokens": plan.stream_tokens}),
            "swap-a": profile(**{"fake-load-ms": FAKE_SWAP_LOAD_MS, "fake-tokens": 1}),
            "swap-b": profile(**{"fake-load-ms": FAKE_SWAP_LOAD_MS, "fake-tokens": 1}),
            "col-a": profile(**{"fake-load-ms": COLLATION_LOAD_MS, "fake-tokens": 1}),
            "col-b": profile(**{"fake-load-ms": COLLATION_LOAD_MS, "fake-tokens": 1}),
            "col-c": profile(**{"fake-load-ms": COLLATION_LOAD_MS, "fake-tokens": 1}),
            "paced": profile(**{"fake-tokens": held_tokens,
                                "fake-token-delay-ms": HELD_TOKEN_DELAY_MS}),
        },
    }


def real_models() -> dict[str, Path]:
    """Two tiny models and one ~215 MB model, written once and cached."""
    sys.path.insert(0, str(ROOT))
    from tests.support.tiny_gguf import write_tiny_llama

    MODELS.mkdir(parents=True, exist_ok=True)
    paths = {"tiny-a": MODELS / "tiny-a.gguf", "tiny-b": MODELS / "tiny-b.gguf",
             "big": MODELS / "big-215mb.gguf"}
    if not paths["tiny-a"].exists():
        write_tiny_llama(paths["tiny-a"], seed=1, name="tiny-a", context_length=4096)
    if not paths["tiny-b"].exists():
        write_tiny_llama(paths["tiny-b"], seed=2, name="tiny-b", context_length=4096)
    if not paths["big"].exists():
        write_tiny_llama(paths["big"], seed=3, name="big", context_length=4096, **BIG)
    return paths


def real_config(binary: Path, models: dict[str, Path]) -> dict[str, Any]:
    """Profiles on the real llama-server. One thread each: the machine has two cores and
    swapd and the load generator need the other one."""
    def profile(model: Path, ctx: int) -> dict[str, Any]:
        return {"model": str(model), "flags": {"ctx-size": ctx, "threads": 1}}

    return {
        "llama_server": {"command": str(binary)},
        "timeouts": {"start": "120s", "stop": "10s", "queue_wait": "120s"},
        "queue": {"max_waiting": 64},
        "profiles": {
            "tiny-a": profile(models["tiny-a"], 4096),
            "tiny-b": profile(models["tiny-b"], 4096),
            # Same file, two contexts: every swap is still a full stop and load.
            "big-a": profile(models["big"], 2048),
            "big-b": profile(models["big"], 1024),
        },
    }


def many_profiles_yaml(n: int) -> str:
    """A config with ``n`` profiles, written the way people write YAML."""
    lines = ["listen: 127.0.0.1:9001", "llama_server:", "  command: llama-server",
             "profiles:"]
    for i in range(n):
        lines += [
            f"  model-{i:04d}:",
            f"    model: /models/model-{i:04d}.gguf",
            f"    display_name: Model {i}",
            f"    aliases: [m{i}]",
            "    ttl: 30m",
            "    flags:",
            "      ctx-size: 8192",
            "      n-gpu-layers: 99",
            "      flash-attn: on",
            "      jinja: true",
        ]
    return "\n".join(lines) + "\n"
