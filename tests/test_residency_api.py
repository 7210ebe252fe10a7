"""Residency through the HTTP API with fake llama-servers on a simulated GPU.

The fake llama-server's ``--fake-gpu-file``/``--fake-gpu-mib`` share one budget between
children and print llama-server's buffer lines; past the budget a load dies with the CUDA
out-of-memory message, as the real one does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio

from swapd.config import parse_config
from swapd.serve import open_server
from tests.test_api import chat, config_text

MiB = 2**20


def gpu_flags(tmp_path: Path, vram_mib: int) -> dict[str, Any]:
    return {"fake-vram-mib": vram_mib, "fake-gpu-file": str(tmp_path / "gpu0"),
            "fake-gpu-mib": 1000}


async def test_an_out_of_memory_load_evicts_the_idle_model_retries_and_is_measured(
        tmp_path: Path) -> None:
    # The plan says both fit (800 MiB each in 2 GiB); the simulated GPU has 1000 MiB.
    text = json.loads(config_text(
        tmp_path, a_flags=gpu_flags(tmp_path, 600), b_flags=gpu_flags(tmp_path, 600),
        gpus=[{"id": 0, "memory": "2GiB"}], residency={"mode": "budget", "reserve": 0}))
    for profile in text["profiles"].values():
        profile["memory"] = "800MiB"
    config = parse_config(json.dumps(text), base_dir=tmp_path)
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=30) as client:
        sup = running.supervisor
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        answer = await client.post("/v1/chat/completions", json=chat("b"))
        assert answer.status_code == 200, answer.text
        kinds = [e.kind for e in sup.events]
        assert "oom_retry" in kinds and sup.stats["starts_failed"] == 0
        with trio.fail_after(5):  # its buffer lines are read just after it is ready
            while not any(e.kind == "measured" and e.data["profile"] == "b"
                          for e in sup.events):
                await sup.wait_changed()
        status = (await client.get("/swapd/status")).json()
        assert [r["name"] for r in status["resident"]] == ["b"]
        assert status["resident"][0]["footprint"]["measured"] == 600 * MiB
        assert status["evictions"]["oom"] == 1
        assert status["gpus"][0]["measured"] == 600 * MiB
        # b was planned from memory: (800 MiB); from now on it plans with the measurement.
        footprint = status["profiles"]["b"]["footprint"]
        assert footprint["source"] == "measured" and footprint["planned"] == 600 * MiB
        assert status["resident"][0]["planned"] == 600 * MiB
        stored = json.loads((tmp_path / "state" / "footprints.json").read_text())
        assert set(stored) == {"a", "b"}
        metrics = (await client.get("/metrics")).text
        assert 'swapd_evictions_total{reason="oom"} 1.0' in metrics
        assert 'swapd_gpu_measured_bytes{gpu="0"} 6.291456e+08' in metrics

        # Unload one model by name; an unknown name is a 404.
        missing = await client.post("/swapd/unload", json={"model": "nope"})
        assert missing.status_code == 404
        unloaded = await client.post("/swapd/unload", json={"model": "b"})
        assert unloaded.json() == {"status": "unloaded", "model": "b", "state": "idle"}
        assert sup.resident() == []
        assert (await client.post("/v1/chat/completions", json=chat("b"))).status_code == 200
        status = (await client.get("/swapd/status")).json()
        assert status["resident"][0]["planned"] == 600 * MiB  # planned as measured


async def test_a_model_that_can_never_fit_goes_to_the_fallback(tmp_path: Path) -> None:
    from tests.test_fallback import remote_upstream
    async with remote_upstream("remote") as url:
        text = json.loads(config_text(tmp_path, gpus=[{"id": 0, "memory": "1GiB"}],
                                      residency={"mode": "budget", "reserve": 0}))
        text["profiles"]["a"]["memory"] = "512MiB"
        text["profiles"]["b"]["memory"] = "4GiB"  # more than the GPU has
        text["fallbacks"] = [{"name": "lan", "base_url": url, "model": "remote"}]
        config = parse_config(json.dumps(text), base_dir=tmp_path)
        async with open_server(config) as running, httpx.AsyncClient(
                base_url=running.url, timeout=30) as client:
            assert (await client.post("/v1/chat/completions",
                                      json=chat("a"))).status_code == 200
            answer = await client.post("/v1/chat/completions", json=chat("b"))
            assert answer.status_code == 200
            assert answer.json()["choices"][0]["message"]["content"].startswith("fake:remote:")
            assert [r["name"] for r in running.supervisor.resident()] == ["a"]  # untouched
            assert [e.kind for e in running.supervisor.events].count("wont_fit") == 1

    config = parse_config(json.dumps({**text, "fallbacks": []}), base_dir=tmp_path)
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=30) as client:
        answer = await client.post("/v1/chat/completions", json=chat("b"))
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["code"] == "model_too_large"
        assert "needs 4096.0 MiB on GPU 0, which has 1024.0 MiB" in error["message"]


def test_swapd_status_prints_each_resident_model_and_each_gpu() -> None:
    from swapd.cli import format_status
    lines = format_status({
        "version": "0.1.0", "state": "ready", "active": "chat", "pid": 7, "port": 4000,
        "inflight": 1, "waiting": {}, "swaps": 0, "starts_failed": 0, "crashes": 0,
        "resident": [
            {"name": "chat", "state": "ready", "pid": 7, "gpus": [0], "planned": 17 * 2**30,
             "inflight": 1, "pinned": False, "draining": False},
            {"name": "embed", "state": "ready", "pid": 8, "gpus": [0],
             "planned": 2**30, "inflight": 0, "pinned": True, "draining": False}],
        "gpus": [{"id": 0, "budget": 23 * 2**30, "planned": 18 * 2**30,
                  "measured": 17 * 2**30}],
    }, url="http://h:9001")
    assert "resident   chat ready (pid 7, GPU 0, 17.0 GiB planned, 1 in flight)" in lines
    assert "resident   embed ready pinned (pid 8, GPU 0, 1.0 GiB planned, 0 in flight)" in lines
    assert "gpu 0      18.0 GiB of 23.0 GiB planned, 17.0 GiB measured" in lines


async def test_swapd_unload_name_unloads_one_model(tmp_path: Path) -> None:
    from tests.test_cli_client import swapd_cli
    text = json.loads(config_text(tmp_path, residency={"mode": "count", "max_models": 2}))
    config = parse_config(json.dumps(text), base_dir=tmp_path)
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=30) as client:
        for model in ("a", "b"):
            assert (await client.post("/swapd/load", json={"model": model})).status_code == 200
        assert sorted(r["name"] for r in running.supervisor.resident()) == ["a", "b"]
        result = await swapd_cli("unload", "alpha", "--url", running.url)
        assert (result.status, result.out) == (0, "unloaded a (state: idle)\n")
        assert [r["name"] for r in running.supervisor.resident()] == ["b"]
        missing = await swapd_cli("unload", "nope", "--url", running.url)
        assert missing.status == 1 and "'nope' is not configured" in missing.err
        status = (await client.get("/swapd/status")).json()
        assert status["swaps"] == 0 and status["evictions"]["unload"] == 1
