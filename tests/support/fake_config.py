"""A config of profiles served by the fake llama-server, as JSON (JSON is YAML).

What the in-process tests share: loopback on a free port, state under the test's tmp
path, the fake as every profile's binary, deadlines that fail fast, keep-alives each
second, and a header-only GGUF for each profile's model file (swapd checks that a model
file is a GGUF before it starts it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.conftest import FAKE_LLAMA_SERVER
from tests.support.tiny_gguf import write_header_only


def fake_config(tmp_path: Path, profiles: dict[str, Any], **extra: Any) -> str:
    """``profiles`` (their ``model`` files written in ``tmp_path``) and ``extra`` keys."""
    write_header_only(*{tmp_path / p["model"] for p in profiles.values()})
    return json.dumps({
        "listen": "127.0.0.1:0",
        "state_dir": str(tmp_path / "state"),
        "llama_server": {"command": [sys.executable, str(FAKE_LLAMA_SERVER)]},
        "timeouts": {"start": "20s", "stop": "5s"},
        "progress": {"keepalive": "1s"},
        "profiles": profiles,
        **extra,
    })
