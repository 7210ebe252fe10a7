"""``contrib/systemd/swapd.service`` keeps its safety properties, and systemd accepts it.

The unit is parsed here by a small reader that keeps repeated keys (``DeviceAllow=``,
``Environment=``), which ``configparser`` would collapse to the last one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "contrib" / "systemd" / "swapd.service"

Unit = dict[str, dict[str, list[str]]]


def read_unit(text: str) -> Unit:
    """Sections -> key -> every value, in order; an empty assignment resets the list."""
    sections: Unit = {}
    current: defaultdict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = defaultdict(list)
            sections[line[1:-1]] = current
            continue
        assert current is not None, f"assignment outside a section: {raw!r}"
        assert not line.endswith("\\"), "no line continuations, please"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        value = value.strip()
        if value:
            current[key.strip()].append(value)
        else:
            current[key.strip()] = []
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return read_unit(UNIT.read_text())["Service"]


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key)
    assert values is not None and len(values) == 1, f"{key}= should be set once: {values}"
    return values[0]


def test_lifecycle(service: dict[str, list[str]]) -> None:
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "ExecStart") == \
        "/usr/local/bin/swapd serve --config /etc/swapd/swapd.yaml"
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "Restart") == "always"
    assert one(service, "WatchdogSec") == "30"
    # SIGTERM to swapd only (it drains, then stops its child), SIGKILL for leftovers.
    assert one(service, "KillMode") == "mixed"
    assert int(one(service, "TimeoutStopSec")) >= 30 + 10 + 10  # drain + stop + margin


def test_state_dir_is_the_only_writable_place(service: dict[str, list[str]]) -> None:
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "StateDirectory") == "swapd"  # -> /var/lib/swapd, $STATE_DIRECTORY
    assert one(service, "CacheDirectory") == "swapd"
    assert one(service, "ProtectHome") == "read-only"
    assert service.get("ReadWritePaths", []) == []
    assert one(service, "User") == "swapd"
    assert one(service, "EnvironmentFile") == "-/etc/swapd/swapd.env"


def test_hardening_that_keeps_the_gpu_reachable(service: dict[str, list[str]]) -> None:
    assert "PrivateDevices" not in service  # would hide /dev/nvidia*, /dev/dri, /dev/kfd
    assert "MemoryDenyWriteExecute" not in service  # CUDA's JIT needs W+X memory
    assert "PrivateUsers" not in service  # would break the render/video group access
    assert "ProcSubset" not in service  # CUDA reads /proc/driver/nvidia
    assert one(service, "SupplementaryGroups").split() == ["video", "render"]
    assert one(service, "DevicePolicy") == "closed"
    allowed = {value.split()[0] for value in service["DeviceAllow"]}
    assert {"char-nvidia*", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
            "char-drm", "char-kfd", "/dev/kfd"} <= allowed
    assert all(value.split()[1] == "rw" for value in service["DeviceAllow"])


def test_hardening(service: dict[str, list[str]]) -> None:
    for key in ("PrivateTmp", "NoNewPrivileges", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "RestrictNamespaces", "LockPersonality", "RestrictRealtime"):
        assert one(service, key) == "yes", key
    assert one(service, "SystemCallArchitectures") == "native"
    assert service["CapabilityBoundingSet"] == []  # present and empty: no capabilities
    assert one(service, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET",
                                                               "AF_INET6"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_it(tmp_path: Path) -> None:
    # verify insists that ExecStart= exists: point it at an executable that does.
    unit = tmp_path / "swapd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/swapd", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "swapd.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
