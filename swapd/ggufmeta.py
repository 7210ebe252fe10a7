"""Read a GGUF file's metadata header: architecture, training context, name, file type.

Probes (``/api/show``, ``/v1/models``) must describe a model without loading it, and the
answer should match what llama-server will report once it does. Only the key/value
header is read, and reading stops at the tokenizer's vocabulary, which can be megabytes
of strings nobody here needs. The ``gguf`` package would do this too, but it pulls in
numpy for a job of a few dozen lines.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import attrs

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@attrs.frozen
class GGUFInfo:
    architecture: str | None
    context_length: int | None
    name: str | None
    size_label: str | None
    file_type: int | None
    file_size: int
    metadata: dict[str, Any]


class GGUFError(ValueError):
    pass


def read_info(path: Path) -> GGUFInfo:
    """Parse the header of ``path``; raise ``GGUFError`` if it is not a GGUF file."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file")
        version, = _unpack(f, "<I")
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is too old")
        _tensors, n_kv = _unpack(f, "<QQ")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f)
            if key.startswith("tokenizer.ggml."):
                break  # the vocabulary: large, and nothing after it is needed here
            kind, = _unpack(f, "<I")
            metadata[key] = _value(f, kind)
        size = path.stat().st_size
    arch = metadata.get("general.architecture")
    ctx = metadata.get(f"{arch}.context_length") if arch else None
    return GGUFInfo(
        architecture=arch if isinstance(arch, str) else None,
        context_length=int(ctx) if isinstance(ctx, int) else None,
        name=_str_or_none(metadata.get("general.name")),
        size_label=_str_or_none(metadata.get("general.size_label")),
        file_type=metadata.get("general.file_type") if isinstance(
            metadata.get("general.file_type"), int) else None,
        file_size=size,
        metadata=metadata,
    )


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _unpack(f: BinaryIO, fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise GGUFError("truncated GGUF header")
    return struct.unpack(fmt, raw)


def _string(f: BinaryIO) -> str:
    length, = _unpack(f, "<Q")
    if length > 1 << 24:
        raise GGUFError("implausible string length in GGUF header")
    return f.read(length).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])[0]
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item_kind, count = _unpack(f, "<IQ")
        if item_kind in _SCALARS and count > 64:  # skip big numeric arrays unread
            f.seek(struct.calcsize(_SCALARS[item_kind]) * count, 1)
            return None
        return [_value(f, item_kind) for _ in range(count)]
    raise GGUFError(f"unknown GGUF value type {kind}")
