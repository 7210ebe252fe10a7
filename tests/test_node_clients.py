"""The JavaScript clients from npm through a swap: ``openai`` (node) and ``ollama`` (JS).

``tests/support/node/clients.mjs`` runs one client against swapd (fake children, real
processes and swaps) and prints what it showed; this file judges it. The packages are
installed once per machine from npm, at the pinned versions, into
``~/.cache/swapd/node-clients``. Without ``node`` and ``npm`` the tests skip, saying
so; CI (``.ci/run``) sets ``$SWAPD_REQUIRE_NODE=1``, which makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from swapd.http.progress import PREFIX
from tests.test_api import swapd

PACKAGES = {"openai": "6.49.0", "ollama": "0.6.4"}
SCRIPT = Path(__file__).parent / "support" / "node" / "clients.mjs"
REQUIRE_NODE_VAR = "SWAPD_REQUIRE_NODE"
INSTALL_DEADLINE = 300.0
"""Seconds npm may take to fetch the packages (once per machine)."""
RUN_DEADLINE = 60.0


@pytest.fixture(scope="module")
def node_clients() -> Path:
    """A directory holding ``clients.mjs`` beside the pinned packages."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        why = f"{', '.join(missing)} not found: the JS client tests need Node.js and npm"
        if os.environ.get(REQUIRE_NODE_VAR, "") not in ("", "0"):
            pytest.fail(f"{why}. ${REQUIRE_NODE_VAR} is set, so they may not skip",
                        pytrace=False)
        pytest.skip(why)
    pins = "-".join(f"{name}{version}" for name, version in sorted(PACKAGES.items()))
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    directory = home / "swapd" / "node-clients" / pins
    if not (directory / "node_modules" / ".swapd-complete").exists():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "package.json").write_text(json.dumps(
            {"name": "swapd-node-clients", "private": True, "type": "module",
             "dependencies": PACKAGES}))
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"],
                       cwd=directory, check=True, timeout=INSTALL_DEADLINE)
        (directory / "node_modules" / ".swapd-complete").touch()
    shutil.copy(SCRIPT, directory / SCRIPT.name)
    return directory


async def run(clients: Path, url: str, client: str, model: str) -> Any:
    done = await trio.run_process(["node", str(clients / SCRIPT.name), url, client, model],
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


async def test_js_clients_stream_and_fail_through_a_swap(tmp_path: Path,
                                                         node_clients: Path) -> None:
    async with swapd(tmp_path) as (running, client):
        async def through_a_swap(name: str) -> Any:
            assert (await client.post("/swapd/load", json={"model": "a"})).status_code == 200
            swaps = running.supervisor.stats["swaps"]
            with trio.fail_after(RUN_DEADLINE):
                seen = await run(node_clients, running.url, name, "b")
            assert running.supervisor.stats["swaps"] == swaps + 1
            return seen

        seen = await through_a_swap("openai")
        assert seen["reasoning"].startswith(PREFIX) and "b is ready" in seen["reasoning"]
        assert seen["content"].startswith("fake:b:")
        assert len(seen["ids"]) == 1  # progress and answer merge under one id

        error = await through_a_swap("openai-overflow")
        assert error["error"] == "APIError"  # in-band: the 200 was out
        assert error["type"] == "exceed_context_size_error"

        seen = await through_a_swap("ollama")
        assert seen["thinking"].startswith(PREFIX)
        assert seen["content"].startswith("fake:")

        error = await through_a_swap("ollama-overflow")  # no think: waits for its status
        assert error["error"] == "ResponseError" and error["status"] == 400
        assert "context" in error["message"]
