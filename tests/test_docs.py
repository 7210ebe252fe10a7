"""The configuration reference and the example config stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from swapd import config as cfg
from swapd.config import load_config

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = (ROOT / "docs" / "configuration.md").read_text()
EXAMPLE = (ROOT / "config" / "swapd.example.yaml").read_text()


def config_keys() -> set[str]:
    """Every key a config file may contain, as the reference names it."""
    keys = set()
    sections = {"listen": None, "state_dir": None, "ttl": None, "profiles": None,
                "fallbacks": None, "gpus": None}
    for field in attrs.fields(cfg.Config):
        if field.name in sections:
            keys.add(field.name)
            continue
        nested = field.type if isinstance(field.type, type) else getattr(cfg, str(
            field.type), None)
        assert nested is not None and attrs.has(nested), field.name
        keys |= {f"{field.name}.{sub.name}" for sub in attrs.fields(nested)}
    keys |= {f"profiles.NAME.{f.name}" for f in attrs.fields(cfg.Profile) if f.name != "name"}
    keys |= {f"fallbacks[].{f.name}" for f in attrs.fields(cfg.Fallback)}
    keys |= {f"gpus[].{f.name}" for f in attrs.fields(cfg.Gpu)}
    return keys


def test_every_config_key_is_in_the_reference() -> None:
    documented = set(re.findall(r"^\| `([a-z_.\[\]A-Z]+)` \|", REFERENCE, re.MULTILINE))
    assert config_keys() - documented == set(), "keys missing from docs/configuration.md"
    assert documented - config_keys() == set(), "docs/configuration.md names unknown keys"


def test_every_config_key_is_in_the_example() -> None:
    for key in config_keys():
        leaf = key.rsplit(".", 1)[-1]
        assert re.search(rf"^\s*#?\s*-?\s*{re.escape(leaf)}:", EXAMPLE, re.MULTILINE), key
    load_config(ROOT / "config" / "swapd.example.yaml")  # and it loads


def test_documented_defaults_match_the_code() -> None:
    defaults = {
        "timeouts.start": "120s", "timeouts.stop": "10s", "timeouts.queue_wait": "120s",
        "timeouts.drain": "30s", "queue.max_waiting": "10", "queue.starvation_bound": "10s",
        "restart.max_failures": "3", "restart.cooldown": "60s", "restart.backoff": "1s",
        "restart.backoff_max": "30s", "restart.stable_after": "60s",
        "progress.keepalive": "5s", "logs.tail_lines": "500",
    }
    for key, text in defaults.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg.Config(profiles={}), section), name)
        assert cfg.parse_duration(text) == value or str(value) == text, key
        assert f"| `{key}` | `{text}` |" in REFERENCE, key
