"""The warm-return bookkeeping at the HTTP boundary: decisions, budget, rejections.

The real save/restore round trip with llama-server is in test_warm_return.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from swapd.config import Config, parse_config
from swapd.core.slotcache import SlotCache


class Child:
    """What SlotCache needs of a running model: a name, a client, its prompt speed."""

    def __init__(self, name: str, handler: Any, prompt_tps: float | None = None) -> None:
        self.name = name
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(handler),
                                        base_url="http://child")
        self.prompt_tps = prompt_tps


def config(tmp_path: Path, budget: str = "1GiB") -> Config:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    return parse_config(f"""
state_dir: {tmp_path}
cache: {{keep: true, budget: {budget}, min_tokens: 100}}
profiles: {{a: {{model: a.gguf}}, b: {{model: b.gguf}}}}
""", base_dir=tmp_path)


def llama(slots: list[dict[str, Any]], bytes_per_token: int = 500,
          restore_status: int = 200) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/slots":
            return httpx.Response(200, json=slots)
        slot = int(request.url.path.rsplit("/", 1)[1])
        tokens = next(s["n_prompt_tokens"] for s in slots if s["id"] == slot) if slots else 0
        if request.url.params["action"] == "save":
            return httpx.Response(200, json={"id_slot": slot, "n_saved": tokens,
                                             "n_written": tokens * bytes_per_token})
        if restore_status != 200:
            return httpx.Response(restore_status, json={"error": {"message": "no"}})
        return httpx.Response(200, json={"id_slot": slot, "n_restored": 4000,
                                         "n_read": 4000 * bytes_per_token})
    return handler


async def test_small_slots_are_not_saved_and_big_ones_are(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cache = SlotCache(tmp_path / "slots", cfg)
    child = Child("a", llama([{"id": 0, "n_prompt_tokens": 50},
                              {"id": 1, "n_prompt_tokens": 4000}]))
    outcome = await cache.save(child, cfg.profiles["a"])
    assert outcome.slots == 1 and outcome.tokens == 4000
    assert "50 tokens (< cache.min_tokens 100)" in outcome.skipped[0]
    index = json.loads((tmp_path / "slots" / "index.json").read_text())
    assert index["a"]["slots"]["1"]["tokens"] == 4000
    assert cache.restorable(cfg.profiles["a"]) == (1, 2_000_000)
    assert cache.argv(cfg.profiles["a"])[0] == "--slot-save-path"


async def test_a_save_that_costs_more_than_it_saves_is_skipped_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path)
    cache = SlotCache(tmp_path / "slots", cfg)
    slots = [{"id": 0, "n_prompt_tokens": 4000}]
    # First save: nothing learned yet, so it saves (500 bytes/token: 2 MB).
    await cache.save(Child("a", llama(slots), prompt_tps=50_000.0), cfg.profiles["a"])
    cache._disk_bps = 1e6  # a slow disk: 2 x 2 MB takes 4 s
    caplog.set_level(logging.INFO, "swapd.core.slotcache")
    outcome = await cache.save(Child("a", llama(slots), prompt_tps=50_000.0),
                               cfg.profiles["a"])
    assert outcome.slots == 0
    (why,) = outcome.skipped
    assert "re-process in ~0.08s at 50000 tok/s" in why and "takes ~4.00s" in why
    assert why in caplog.text


async def test_a_rejected_restore_starts_cold_without_failing(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cache = SlotCache(tmp_path / "slots", cfg)
    slots = [{"id": 0, "n_prompt_tokens": 4000}]
    await cache.save(Child("a", llama(slots)), cfg.profiles["a"])
    outcome = await cache.restore(Child("a", llama(slots, restore_status=400)),
                                  cfg.profiles["a"])
    assert outcome.slots == 0 and cache.stats["rejected"] == 1
    ok = await cache.restore(Child("a", llama(slots)), cfg.profiles["a"])
    assert ok.slots == 1 and cache.stats["tokens_restored"] == 4000


async def test_the_budget_drops_the_least_recently_used(tmp_path: Path) -> None:
    cfg = config(tmp_path, budget="3MB")  # room for one 2 MB slot, not two
    cache = SlotCache(tmp_path / "slots", cfg)
    slots = [{"id": 0, "n_prompt_tokens": 4000}]
    await cache.save(Child("a", llama(slots)), cfg.profiles["a"])
    await cache.save(Child("b", llama(slots)), cfg.profiles["b"])
    assert cache.restorable(cfg.profiles["a"]) == (0, 0)  # the older one went
    assert cache.restorable(cfg.profiles["b"]) == (1, 2_000_000)
    assert cache.stats["evicted"] == 1


async def test_a_changed_model_file_drops_its_caches(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cache = SlotCache(tmp_path / "slots", cfg)
    await cache.save(Child("a", llama([{"id": 0, "n_prompt_tokens": 4000}])),
                     cfg.profiles["a"])
    (tmp_path / "a.gguf").write_bytes(b"GGUF, requantized")
    assert cache.restorable(cfg.profiles["a"]) == (0, 0)
