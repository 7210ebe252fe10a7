"""Warm return (issue 10): what an A -> B -> A return costs with and without it.

A long prompt is sent to A, a short one to B (a swap), then A's prompt again with a new
turn. The figures come from llama-server's own accounting (``timings.prompt_n``: tokens
it processed) and the wall time of the returning request, which asks for one token, so
it is the time to first token. The table's left column is ``cache.keep: false``, the
right one ``cache.keep: true``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .client import fetch
from .procs import HOST, Swapd

PREFIX = "hello world " * 300  # ~2,700 tokens of the tiny models' vocabulary


def warm_config(binary: Path, models: dict[str, Path], keep: bool) -> dict[str, Any]:
    def profile(model: Path) -> dict[str, Any]:
        return {"model": str(model), "flags": {"ctx-size": 4096, "parallel": 1,
                                                "threads": 1}}

    return {"llama_server": {"command": str(binary)}, "cache": {"keep": keep},
            "timeouts": {"start": "120s"},
            "profiles": {"tiny-a": profile(models["tiny-a"]),
                         "tiny-b": profile(models["tiny-b"])}}


async def _complete(swapd: Swapd, model: str, prompt: str) -> tuple[dict[str, Any], float]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 1,
                       "temperature": 0}).encode()
    answer = await fetch(HOST, swapd.port, "POST", "/v1/completions", body,
                         request_timeout=300)
    assert answer.status == 200 and answer.body is not None, answer.status
    timings: dict[str, Any] = json.loads(bytes(answer.body))["timings"]
    return timings, answer.ended_at - answer.started


async def warm_return(report: Any, binary: Path, models: dict[str, Path]) -> None:
    figures: dict[bool, dict[str, float]] = {}
    for keep in (False, True):
        swapd = Swapd(warm_config(binary, models, keep), report.workdir,
                      f"warm-{'on' if keep else 'off'}")
        await swapd.start()
        try:
            cold, cold_s = await _complete(swapd, "tiny-a", PREFIX)
            await _complete(swapd, "tiny-b", "something else")  # the swap
            back, back_s = await _complete(swapd, "tiny-a", PREFIX + " and a new turn")
            status = await swapd.status()
        finally:
            await swapd.stop()
        figures[keep] = {"first_prompt_n": cold["prompt_n"], "first_s": cold_s,
                         "return_prompt_n": back["prompt_n"], "return_cache_n":
                         back.get("cache_n", 0), "return_s": back_s,
                         "restores": status["cache"]["restores"]}
        report.say(f"warm return {'on' if keep else 'off'}: {figures[keep]}")
    report.results["warm_return"] = {"off": figures[False], "on": figures[True]}
    off, on = figures[False], figures[True]
    section = "8. warm return (left: cache off, right: on)"
    report.row(section, "A->B->A: prompt tokens processed on return", "",
               off["return_prompt_n"], on["return_prompt_n"],
               target="only the new turn", met=on["return_prompt_n"] < 50)
    report.row(section, "A->B->A: time to first token on return", "ms",
               1000 * off["return_s"], 1000 * on["return_s"])
    report.row(section, "first request to A (cold either way)", "ms",
               1000 * off["first_s"], 1000 * on["first_s"])
