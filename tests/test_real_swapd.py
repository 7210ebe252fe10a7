"""swapd end to end with the real llama-server on tiny generated models.

Two GGUFs and three profiles (two on the same file with different contexts), swapped
A -> B -> A by real clients, streamed, with progress on the waiting stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
import trio

from swapd.config import parse_config
from swapd.core.process import LlamaProcess
from swapd.http.progress import PREFIX
from swapd.serve import open_server
from tests.support.llama_feed import open_feed

pytestmark = pytest.mark.real_llama


def real_config(tmp_path: Path, models: Path, binary: Path) -> str:
    return json.dumps({
        "listen": "127.0.0.1:0",
        "state_dir": str(tmp_path / "state"),
        "llama_server": {"command": str(binary)},
        "timeouts": {"start": "60s", "stop": "10s"},
        "profiles": {
            "tiny-a": {"model": str(models / "a.gguf"), "aliases": ["a"],
                       "flags": {"ctx-size": 2048, "threads": 1, "jinja": True}},
            "tiny-a-long": {"model": str(models / "a.gguf"),
                            "flags": {"ctx-size": 4096, "threads": 1}},
            "tiny-b": {"model": str(models / "b.gguf"), "flags": {"ctx-size": 1024,
                                                                  "threads": 1}},
        },
    })


async def test_streamed_chat_through_swaps_with_the_real_server(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path) -> None:
    config = parse_config(real_config(tmp_path, tiny_models, llama_server_bin))
    async with open_server(config) as running:
        sdk = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)

        def stream(model: str) -> tuple[str, str, int]:
            reasoning, content, chunks = "", "", 0
            for chunk in sdk.chat.completions.create(
                    model=model, max_tokens=8, stream=True,
                    messages=[{"role": "user", "content": "hello"}]):
                chunks += 1
                if chunk.choices:
                    delta = chunk.choices[0].delta
                    reasoning += getattr(delta, "reasoning_content", None) or ""
                    content += delta.content or ""
            return reasoning, content, chunks

        pids = []
        for model in ("a", "tiny-b", "tiny-a"):
            reasoning, _content, chunks = await trio.to_thread.run_sync(stream, model)
            assert reasoning.startswith(PREFIX)  # it had to wait for a load
            assert chunks > 1
            status = running.supervisor.status()
            assert status["state"] == "ready"
            pids.append(status["pid"])
        assert len(set(pids)) == 3  # a real stop and start at every swap
        assert running.supervisor.stats["swaps"] == 2

        # While tiny-a runs, the probes describe both contexts without loading anything.
        async with httpx.AsyncClient(base_url=running.url) as client:
            models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
            assert models["tiny-a"]["context_length"] == 2048
            assert models["tiny-a-long"]["context_length"] == 4096
            assert models["tiny-b"]["context_length"] == 1024
            live = (await client.get("/props")).json()
            assert live["default_generation_settings"]["n_ctx"] == 2048
            shown = (await client.post("/api/show", json={"model": "tiny-b"})).json()
            assert shown["parameters"] == "num_ctx 1024"
            assert shown["model_info"]["llama.context_length"] == 1024
        assert running.supervisor.status()["pid"] == pids[-1]

        # A non-streaming request for the other profile on the same GGUF: a swap too.
        completion = await trio.to_thread.run_sync(lambda: sdk.chat.completions.create(
            model="tiny-a-long", max_tokens=4,
            messages=[{"role": "user", "content": "hello"}]))
        assert completion.choices[0].message.content is not None
        assert completion.model  # llama-server answered
        assert running.supervisor.active.name == "tiny-a-long"  # type: ignore[union-attr]
        assert set(running.supervisor.load_seconds) == {"tiny-a", "tiny-b", "tiny-a-long"}


async def test_real_start_failures_say_what_to_fix(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path) -> None:
    config = json.loads(real_config(tmp_path, tiny_models, llama_server_bin))
    config["profiles"]["missing"] = {"model": str(tmp_path / "nope.gguf")}
    config["profiles"]["badflag"] = {"model": str(tiny_models / "a.gguf"),
                                     "flags": {"no-such-flag": True}}
    config["profiles"]["badvalue"] = {"model": str(tiny_models / "a.gguf"),
                                      "flags": {"n-gpu-layers": "lots"}}

    async def ask(model: str) -> httpx.Response:
        return await client.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})

    async with open_server(parse_config(json.dumps(config))) as running, \
            httpx.AsyncClient(base_url=running.url, timeout=60) as client:
        assert (await ask("tiny-b")).status_code == 200
        pid = running.supervisor.proc.pid  # type: ignore[union-attr]
        # Refused before tiny-b is stopped: the file, and the flag names (checked
        # against this binary's --help).
        for model, texts in (
                ("missing", ("not started: cannot read", "model path is a readable GGUF")),
                ("badflag", ("not started: llama-server does not accept --no-such-flag",
                             "run 'swapd check'"))):
            answer = await ask(model)
            assert answer.status_code == 503
            message = answer.json()["error"]["message"]
            assert all(text in message for text in texts), message
            assert running.supervisor.proc.pid == pid  # type: ignore[union-attr]
        # What only llama-server can judge still fails with its exit code and a hint.
        answer = await ask("badvalue")
        assert answer.status_code == 503
        message = answer.json()["error"]["message"]
        assert "exited with code 1" in message and "run 'swapd check'" in message, message
        # a good profile still loads after those failures
        assert (await ask("tiny-b")).status_code == 200


def liveness_config(tmp_path: Path, models: Path, binary: Path) -> str:
    """tiny-a with an impatient health probe: 200 ms of silence, 3 misses of 200 ms."""
    config = json.loads(real_config(tmp_path, models, binary))
    config["timeouts"].update({"health_check": "200ms", "health_check_timeout": "200ms"})
    config["restart"] = {"backoff": "0s"}
    config["profiles"]["tiny-a"]["flags"]["parallel"] = 2
    return json.dumps(config)


async def test_a_busy_real_server_is_not_taken_for_a_hung_one(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-streamed answers send nothing until they are complete, so the probe does run
    while both slots (and a queue behind them) generate: llama-server answers /health
    from its HTTP threads meanwhile, and nothing is killed."""
    probes: list[bool] = []
    answers_health = LlamaProcess.answers_health

    async def counted(self: LlamaProcess, within: float) -> bool:
        probes.append(await answers_health(self, within))
        return probes[-1]

    monkeypatch.setattr(LlamaProcess, "answers_health", counted)
    config = parse_config(liveness_config(tmp_path, tiny_models, llama_server_bin))
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=120) as client:
        statuses: list[int] = []

        async def generate() -> None:
            response = await client.post("/v1/chat/completions", json={
                "model": "tiny-a", "max_tokens": 1000, "ignore_eos": True,
                "messages": [{"role": "user", "content": "hello"}]})
            statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(generate)
        assert statuses == [200] * 6
        assert probes and all(probes)  # probed while busy, and every probe answered
        assert running.supervisor.stats["hangs"] == 0


async def test_a_stopped_real_server_is_killed_and_replaced(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path) -> None:
    config = parse_config(liveness_config(tmp_path, tiny_models, llama_server_bin))
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=60) as client:
        assert (await client.post("/swapd/load", json={"model": "tiny-a"})).status_code == 200
        proc = running.supervisor.proc
        assert proc is not None
        text = b""
        try:
            async with client.stream("POST", "/v1/chat/completions", json={
                    "model": "tiny-a", "max_tokens": 1000, "ignore_eos": True,
                    "stream": True,
                    "messages": [{"role": "user", "content": "hello"}]}) as streamed:
                async for chunk in streamed.aiter_raw():
                    if not text:
                        os.kill(proc.pid, signal.SIGSTOP)  # mid-answer
                    text += chunk
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
        events = [line for line in text.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert "stopped answering its health check" in events[-2]
        with trio.fail_after(10):
            await proc.exited.wait()
        assert proc.exit_code == -signal.SIGKILL
        again = await client.post("/v1/chat/completions", json={
            "model": "tiny-a", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]})
        assert again.status_code == 200
        assert running.supervisor.proc is not None and running.supervisor.proc.pid != proc.pid


async def test_an_embedding_and_a_chat_model_stay_resident_together(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path) -> None:
    """Residency with the real server: two models side by side, interleaved requests
    served with no swap; a third that does not fit evicts the least recently used."""
    config = json.loads(real_config(tmp_path, tiny_models, llama_server_bin))
    config["gpus"] = [{"id": 0, "memory": "10GiB"}]
    config["residency"] = {"mode": "budget", "reserve": 0}
    profiles = config["profiles"]
    profiles["tiny-a"]["memory"] = "4GiB"
    profiles["tiny-b"]["memory"] = "4GiB"
    profiles["tiny-b"]["flags"] |= {"embedding": True, "pooling": "mean"}
    profiles["tiny-a-long"]["memory"] = "4GiB"  # 3 x 4 GiB > 10 GiB: one must go

    async def chat(client: httpx.AsyncClient, model: str) -> None:
        answer = await client.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text

    async def embed(client: httpx.AsyncClient) -> None:
        answer = await client.post("/v1/embeddings", json={"model": "tiny-b",
                                                           "input": "hello"})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["data"][0]["embedding"]) > 0

    async with open_server(parse_config(json.dumps(config))) as running, \
            httpx.AsyncClient(base_url=running.url, timeout=60) as client:
        sup = running.supervisor
        await chat(client, "tiny-a")
        await embed(client)

        def pids() -> dict[str, int]:
            return {row["name"]: row["pid"] for row in sup.resident()}

        both = pids()
        assert set(both) == {"tiny-a", "tiny-b"}
        for _ in range(3):
            await embed(client)
            await chat(client, "tiny-a")
        assert pids() == both  # neither was restarted
        assert sup.stats["swaps"] == 0
        ps = (await client.get("/api/ps")).json()["models"]
        assert sorted(m["name"] for m in ps) == ["tiny-a", "tiny-b"]
        assert all(m["size_vram"] == 4 * 2**30 for m in ps)
        # tiny-b (the embeddings) was used before tiny-a's last chat: it goes.
        await chat(client, "tiny-a-long")
        after = pids()
        assert set(after) == {"tiny-a", "tiny-a-long"}
        assert after["tiny-a"] == both["tiny-a"]
        assert sup.stats["swaps"] == 1
        status = (await client.get("/swapd/status")).json()
        assert status["gpus"][0]["planned"] == 8 * 2**30
        assert {r["name"] for r in status["resident"]} == {"tiny-a", "tiny-a-long"}


async def test_discovery_reports_the_context_one_request_gets(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path) -> None:
    """Two slots split ctx-size 4096: each request gets 2048, and every discovery route
    says so (computed before the load, the child's own figure after it), so a client that
    sizes its prompt from discovery fits, and one token more gets llama-server's 400."""
    config = parse_config(json.dumps({
        "listen": "127.0.0.1:0",
        "state_dir": str(tmp_path / "state"),
        "llama_server": {"command": str(llama_server_bin)},
        "timeouts": {"start": "60s", "stop": "10s"},
        "profiles": {
            "tiny-b": {"model": str(tiny_models / "b.gguf"),
                       "flags": {"ctx-size": 1024, "threads": 1}},
            "split": {"model": str(tiny_models / "a.gguf"),
                      "flags": {"ctx-size": 4096, "parallel": 2, "threads": 1}},
        },
    }))
    async with open_server(config) as running:
        sdk = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)

        def discovered() -> dict[str, dict[str, object]]:
            return {m.id: m.model_extra or {} for m in sdk.models.list()}

        before = (await trio.to_thread.run_sync(discovered))["split"]
        assert (before["context_length"], before["context_source"]) == (2048, "computed")

        def complete(model: str, tokens: int) -> object:
            return sdk.completions.create(model=model, max_tokens=1,
                                          prompt=[300 + i % 200 for i in range(tokens)])

        await trio.to_thread.run_sync(complete, "tiny-b", 8)
        await trio.to_thread.run_sync(complete, "split", 8)  # a real swap: b -> split
        assert running.supervisor.stats["swaps"] == 1
        async with running.supervisor.lease("split") as lease:
            child = (await lease.proc.client.get("/props")).json()
        per_request = child["default_generation_settings"]["n_ctx"]
        assert per_request == 2048  # what llama-server itself gives a slot

        after = (await trio.to_thread.run_sync(discovered))["split"]
        assert (after["context_length"], after["context_source"]) == (per_request, "live")
        assert after["max_model_len"] == per_request
        async with httpx.AsyncClient(base_url=running.url) as client:
            shown = (await client.post("/api/show", json={"model": "split"})).json()
            assert shown["parameters"] == f"num_ctx {per_request}"
            assert shown["model_info"]["llama.context_length"] == per_request
            props = (await client.get("/props", params={"model": "split"})).json()
            assert props["default_generation_settings"]["n_ctx"] == per_request
            lm = {m["key"]: m for m in (await client.get("/api/v1/models")).json()["models"]}
            assert lm["split"]["max_context_length"] == per_request
            assert lm["split"]["loaded_instances"][0]["config"]["context_length"] == per_request
            ps = (await client.get("/api/ps")).json()["models"]
            assert [m["context_length"] for m in ps if m["name"] == "split"] == [per_request]

        # The prompt that fits the advertised context (one token left for the answer)
        # is served; one token more is refused by llama-server itself.
        await trio.to_thread.run_sync(complete, "split", per_request - 1)
        with pytest.raises(openai.BadRequestError, match="exceeds the available context"):
            await trio.to_thread.run_sync(complete, "split", per_request)


async def test_llamacpp_router_api_loads_swaps_and_unloads_the_real_server(
        tmp_path: Path, tiny_models: Path, llama_server_bin: Path) -> None:
    """llama.cpp's router API on the real server: load -> loaded -> a load of another
    model is a real swap on /models/sse (one unloaded, the other loading with progress,
    then loaded) -> unload -> unloaded, with /v1/models saying so at every step."""
    config = parse_config(real_config(tmp_path, tiny_models, llama_server_bin))
    async with open_server(config) as running, httpx.AsyncClient(
            base_url=running.url, timeout=60) as client, open_feed(client) as feed:

        async def status(model: str) -> dict[str, object]:
            models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
            return models[model]["status"]  # type: ignore[no-any-return]

        assert await status("tiny-a") == {"value": "unloaded"}
        answer = await client.post("/models/load", json={"model": "a"})  # an alias
        assert (answer.status_code, answer.json()) == (200, {"success": True})
        loaded_a = await feed.wait_status("tiny-a", "loaded")
        assert await status("tiny-a") == {"value": "loaded"}
        pid_a = running.supervisor.proc.pid  # type: ignore[union-attr]

        assert (await client.post("/models/load", json={"model": "tiny-b"})).status_code == 200
        loaded_b = await feed.wait_status("tiny-b", "loaded", loaded_a)
        swap = [(r["model"], r["event"], r["data"]["status"])
                for r in feed.records[loaded_a + 1:loaded_b + 1]]
        assert swap[0] == ("tiny-a", "status_change", "unloaded")
        assert swap[1] == ("tiny-b", "model_status", "loading")
        assert set(swap[2:-1]) == {("tiny-b", "status_change", "loading")}
        assert swap[-1] == ("tiny-b", "status_change", "loaded")
        stages = [r["data"]["progress"] for r in feed.records[loaded_a + 1:loaded_b]
                  if "progress" in r["data"]]
        assert stages[0]["value"] == 0.0 and stages[-1]["value"] == 1.0
        assert all(s["stages"] == ["text_model"] for s in stages)
        assert feed.records[loaded_a + 1]["data"]["exit_code"] == 0  # a stop, not a crash
        assert running.supervisor.proc.pid != pid_a  # type: ignore[union-attr]
        assert (await status("tiny-a"), await status("tiny-b")) == (
            {"value": "unloaded"}, {"value": "loaded"})

        answer = await client.post("/models/unload", json={"model": "tiny-b"})
        assert (answer.status_code, answer.json()) == (200, {"success": True})
        await feed.wait_status("tiny-b", "unloaded", loaded_b)
        assert await status("tiny-b") == {"value": "unloaded"}
        assert not running.supervisor.children()
        assert not feed.odd_lines
