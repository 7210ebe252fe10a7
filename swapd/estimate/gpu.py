"""How much memory the GPU has: ``nvidia-smi``'s answer, or a size the user wrote.

Its own module because it is the only part of the estimator that runs a program.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import TYPE_CHECKING

from swapd.estimate.memory import GiB, MiB

if TYPE_CHECKING:
    pass



_GPU_MEMORY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(i)?(B)?|(B))?\s*",
                         re.IGNORECASE)
_PREFIX_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_gpu_memory(text: str) -> int:
    """Bytes from ``24GiB``, ``24G``, ``80 GiB``, ``24000MiB``, ``24GB`` (decimal, 10^9) or
    a bare number of GiB (``24``). Raises ``ValueError`` naming the expected form."""
    match = _GPU_MEMORY.fullmatch(text)
    if match is None:
        raise ValueError(f"expected a GPU memory size like 24GiB or 24000MiB, got {text!r}")
    number, prefix, binary, byte, bare_byte = match.groups()
    if bare_byte:
        factor = 1
    elif prefix is None:
        factor = GiB
    elif byte and not binary:
        factor = 1000 ** _PREFIX_POWER[prefix.lower()]
    else:
        factor = 1024 ** _PREFIX_POWER[prefix.lower()]
    size = round(float(number) * factor)
    if size <= 0:
        raise ValueError(f"a GPU memory size must be more than 0, got {text!r}")
    return size


def detect_gpu_memory(*, nvidia_smi: str = "nvidia-smi", timeout: float = 10.0,
                      visible_devices: str | None = None) -> int | None:
    """Total memory of the NVIDIA GPUs llama-server will see, via ``nvidia-smi``, in bytes;
    None without nvidia-smi or GPUs. ``visible_devices`` (default: the environment's
    ``CUDA_VISIBLE_DEVICES``) limits the sum to those indices or UUIDs.

    Blocking (it runs a process): call it once at start-up, or in a worker thread.
    """
    binary = shutil.which(nvidia_smi)
    if binary is None:
        return None
    try:
        result = subprocess.run(
            [binary, "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    if visible_devices is None:
        visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    wanted = None if visible_devices is None else {
        item.strip() for item in visible_devices.split(",") if item.strip()}
    total = 0
    for line in result.stdout.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or not parts[2].isdigit():
            continue
        index, uuid, mib = parts
        if wanted is not None and index not in wanted and uuid not in wanted:
            continue
        total += int(mib) * MiB
    return total or None
