"""API keys and request limits at the front door."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from swapd.auth import load_keys
from swapd.config import Security, parse_config
from swapd.errors import ConfigError
from swapd.serve import open_server
from tests.test_api import chat, config_text


async def test_api_and_admin_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPD_TEST_KEYS", "k1, k2")
    admin_file = tmp_path / "admin.keys"
    admin_file.write_text("# operators\nadmin-secret\n")
    config = parse_config(config_text(tmp_path, security={
        "api_key_env": "SWAPD_TEST_KEYS", "admin_key_file": str(admin_file)}))
    async with open_server(config) as running, httpx.AsyncClient(base_url=running.url) as c:
        refused = await c.get("/v1/models")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert (await c.get("/v1/models", headers={"authorization": "Bearer k2"})
                ).status_code == 200
        assert (await c.get("/v1/models", headers={"x-api-key": "k1"})).status_code == 200
        assert (await c.get("/v1/models", headers={"authorization": "Bearer k3"})
                ).status_code == 401
        assert (await c.post("/v1/chat/completions", json=chat("a"))).status_code == 401
        assert (await c.get("/health")).status_code == 200  # liveness needs no secret
        # operations take the admin key, not an API key
        assert (await c.get("/swapd/status", headers={"x-api-key": "k1"})
                ).status_code == 401
        assert (await c.get("/metrics", headers={"x-api-key": "k1"})).status_code == 401
        assert (await c.get("/swapd/status", headers={"authorization": "Bearer admin-secret"})
                ).status_code == 200
        assert running.supervisor.proc is None


def test_named_but_missing_keys_are_config_errors(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEYS", raising=False)
    with pytest.raises(ConfigError, match=r"\$NO_SUCH_KEYS is empty or not set @ "
                                          r"security.api_key_env"):
        load_keys(Security(api_key_env="NO_SUCH_KEYS"))
    with pytest.raises(ConfigError, match=r"cannot read .*nope\.keys.* @ security\.admin_key_file"):
        load_keys(Security(admin_key_file=tmp_path / "nope.keys"))
    assert load_keys(Security()).required("/v1/models") == ()
