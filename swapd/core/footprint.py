"""What a loaded model really holds on each device, read from llama-server's own log.

While it loads, llama-server prints one line per buffer it allocates::

    load_tensors:        CUDA0 model buffer size =  16240.50 MiB
    llama_kv_cache:      CUDA0 KV buffer size =  8192.00 MiB
    sched_reserve:      CUDA0 compute buffer size =   247.31 MiB

(this build prints them at ``-lv 4``; CUDA builds name each device ``CUDA0``, ``CUDA1``..).
:class:`Footprint` adds them up per device; :class:`FootprintStore` remembers the last
one per profile in ``state_dir`` so the residency planner can prefer a measurement to the
GGUF estimate from the second load on. A measurement belongs to one definition of the
profile (model file, flags): a changed profile is measured afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

log = logging.getLogger(__name__)

MiB = 2**20

BUFFER_LINE = re.compile(
    r"(?P<device>[A-Za-z][\w]*)\s+(?P<kind>model|KV|compute|output|RS) buffer size\s*=\s*"
    r"(?P<mib>\d+(?:\.\d+)?) MiB")
"""One buffer line; ``CPU_REPACK`` copies and host buffers are told apart by device."""

HOST_DEVICES = frozenset({"CPU", "CPU_Mapped", "CPU_REPACK", "CUDA_Host", "CUDA_Host_Mapped"})
"""Buffers in system memory: they never count against a GPU's budget."""


@attrs.frozen
class Footprint:
    """Bytes per device and per kind of buffer, as llama-server reported them."""

    buffers: Mapping[str, Mapping[str, int]]  # device -> kind -> bytes

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Footprint | None:
        """The buffers in ``lines``; None when none were printed (a quiet build)."""
        buffers: dict[str, dict[str, int]] = {}
        for line in lines:
            for match in BUFFER_LINE.finditer(line):
                kinds = buffers.setdefault(match["device"], {})
                kinds[match["kind"]] = kinds.get(match["kind"], 0) + round(
                    float(match["mib"]) * MiB)
        return cls(buffers) if buffers else None

    def on_gpus(self) -> dict[str, int]:
        """Bytes per GPU device name (``CUDA0``: 24 GB...), host buffers left out."""
        return {device: sum(kinds.values()) for device, kinds in self.buffers.items()
                if device not in HOST_DEVICES}

    @property
    def gpu_total(self) -> int:
        return sum(self.on_gpus().values())


def definition_key(model: Path, flags: Mapping[str, object], model_mtime: float) -> str:
    """One profile definition: a measurement taken under another is not reused."""
    text = json.dumps([str(model), model_mtime, sorted((k, repr(v)) for k, v in flags.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FootprintStore:
    """The last measured footprint of each profile, kept in ``state_dir``.

    Writes that fail (a full or read-only disk) are logged once and the measurement
    stays in memory: serving never depends on this file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, dict[str, object]] = self._read()
        self._warned = False

    def has(self, profile: str) -> bool:
        """Is any measurement of ``profile`` kept (of whichever definition)?"""
        return profile in self._entries

    def get(self, profile: str, key: str) -> Footprint | None:
        entry = self._entries.get(profile)
        if entry is None or entry.get("key") != key:
            return None
        buffers = entry.get("buffers")
        if not isinstance(buffers, dict):
            return None
        return Footprint({str(d): {str(k): int(v) for k, v in kinds.items()}
                          for d, kinds in buffers.items() if isinstance(kinds, dict)})

    def put(self, profile: str, key: str, footprint: Footprint) -> None:
        self._entries[profile] = {"key": key, "buffers": {
            d: dict(kinds) for d, kinds in footprint.buffers.items()}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._entries, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError as error:
            if not self._warned:
                log.warning("cannot remember measured footprints in %s: %s (kept in "
                            "memory)", self.path, error)
                self._warned = True

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, dict)}
