"""Warm return with the real llama-server: a returning conversation skips its prefix.

The proof is llama-server's own accounting: ``timings.prompt_n`` (tokens it processed)
and ``timings.cache_n`` (tokens it reused) in its answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from swapd.config import parse_config
from swapd.serve import open_server

pytestmark = pytest.mark.real_llama

PREFIX = "hello world " * 300  # ~2,700 tokens of the tiny models' vocabulary


def warm_config(tmp_path: Path, models: Path, binary: Path, keep: bool) -> str:
    return json.dumps({
        "listen": "127.0.0.1:0",
        "state_dir": str(tmp_path / "state"),
        "llama_server": {"command": str(binary)},
        "cache": {"keep": keep},
        "profiles": {
            "a": {"model": str(models / "a.gguf"),
                  "flags": {"ctx-size": 4096, "parallel": 1, "threads": 2}},
            "b": {"model": str(models / "b.gguf"),
                  "flags": {"ctx-size": 1024, "parallel": 1, "threads": 2}},
        },
    })


async def complete(client: httpx.AsyncClient, model: str, prompt: str) -> dict[str, Any]:
    response = await client.post("/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200, response.text
    timings: dict[str, Any] = response.json()["timings"]
    return timings


@pytest.mark.parametrize("keep", [True, False])
async def test_a_returning_conversation_only_processes_its_new_tokens(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path, keep: bool) -> None:
    config = parse_config(warm_config(tmp_path, tiny_models, llama_server_bin, keep))
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=120) as client:
        first = await complete(client, "a", PREFIX)
        assert first["prompt_n"] > 2000  # cold: the whole prompt
        await complete(client, "b", "something else entirely")  # a swap: a is stopped
        again = await complete(client, "a", PREFIX + " and a new turn")
        status = running.supervisor.status()
    if keep:
        assert again["prompt_n"] < 50, again  # only the new turn
        assert again["cache_n"] > 2000
        assert status["cache"]["restores"] == 1
        assert status["cache"]["tokens_restored"] > 2000
        phases = [e.data["text"] for e in running.supervisor.events if e.kind == "phase"]
        assert "saving a's prompt cache" in phases
        assert any(p.startswith("restoring a's prompt cache") for p in phases)
    else:
        assert again["prompt_n"] > 2000  # the control: everything again
        assert status["cache"]["restores"] == 0


async def test_a_changed_profile_drops_its_saved_cache(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path) -> None:
    path = tmp_path / "swapd.yaml"
    path.write_text(warm_config(tmp_path, tiny_models, llama_server_bin, keep=True))
    config = parse_config(path.read_text())
    async with open_server(config, config_path=path) as running, httpx.AsyncClient(
            base_url=running.url, timeout=120) as client:
        await complete(client, "a", PREFIX)
        await complete(client, "b", "x")
        assert running.supervisor.slots.status()["profiles"]["a"]["slots"] == 1
        changed = json.loads(path.read_text())
        changed["profiles"]["a"]["flags"]["ctx-size"] = 3072
        path.write_text(json.dumps(changed))
        assert (await client.post("/swapd/reload")).status_code == 200
        again = await complete(client, "a", PREFIX[:8000] + " new")
        assert again["prompt_n"] > 1500  # cold: the old cache no longer fits the model
        assert running.supervisor.slots.status()["restores"] == 0
