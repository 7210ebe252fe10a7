"""A GGUF file's header: metadata and tensor table, read without touching tensor data.

The estimator sizes a model from this, preflight checks that a model file is one, and
probes read the training context from it. :class:`LayoutCache` keeps one parse per file.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from swapd.errors import ModelFileError, ModelLayoutError

if TYPE_CHECKING:
    pass



# --- ggml types ------------------------------------------------------------------------


@attrs.frozen
class GGMLType:
    """A ggml tensor type: ``block_size`` elements are stored in ``type_size`` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int

    def row_bytes(self, elements: int) -> int:
        """Bytes of ``elements`` values (a multiple of ``block_size``), as ``ggml_row_size``."""
        return elements // self.block_size * self.type_size


def _types(*rows: tuple[int, str, int, int]) -> Mapping[int, GGMLType]:
    return {row[0]: GGMLType(*row) for row in rows}


GGML_TYPES: Mapping[int, GGMLType] = _types(
    # id, name (ggml's type_name), elements per block, bytes per block -- ggml/src/ggml.c
    # type_traits and the block structs' static_asserts in ggml/src/ggml-common.h.
    (0, "f32", 1, 4), (1, "f16", 1, 2),
    (2, "q4_0", 32, 18), (3, "q4_1", 32, 20),
    (6, "q5_0", 32, 22), (7, "q5_1", 32, 24),
    (8, "q8_0", 32, 34),
    (9, "q8_1", 32, 36),  # 2 halves + 32 int8; gguf-py still says 40 (two floats, long gone)
    (10, "q2_K", 256, 84), (11, "q3_K", 256, 110), (12, "q4_K", 256, 144),
    (13, "q5_K", 256, 176), (14, "q6_K", 256, 210), (15, "q8_K", 256, 292),
    (16, "iq2_xxs", 256, 66), (17, "iq2_xs", 256, 74), (18, "iq3_xxs", 256, 98),
    (19, "iq1_s", 256, 50), (20, "iq4_nl", 32, 18), (21, "iq3_s", 256, 110),
    (22, "iq2_s", 256, 82), (23, "iq4_xs", 256, 136),
    (24, "i8", 1, 1), (25, "i16", 1, 2), (26, "i32", 1, 4), (27, "i64", 1, 8),
    (28, "f64", 1, 8), (29, "iq1_m", 256, 56), (30, "bf16", 1, 2),
    # 31-33 (Q4_0_4_4 ...) and 36-38 (IQ4_NL_4_4 ...) were removed: runtime repacking
    (34, "tq1_0", 256, 54), (35, "tq2_0", 256, 66),
    (39, "mxfp4", 32, 17), (40, "nvfp4", 64, 36),
    (41, "q1_0", 128, 18), (42, "q2_0", 64, 18),
)
"""Every ggml type a GGUF tensor may have, by its id in the file."""

_TYPES_BY_NAME = {t.name.lower(): t for t in GGML_TYPES.values()}

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
"""The values llama-server accepts for ``--cache-type-k``/``--cache-type-v``."""

_FLOAT_TYPES = frozenset({"f32", "f16", "bf16"})


def tensor_nbytes(ggml_type: GGMLType, shape: Sequence[int]) -> int:
    """Bytes of a contiguous tensor: whole blocks along the first axis, times the rows."""
    if not shape:
        return ggml_type.type_size // ggml_type.block_size
    rows = math.prod(shape[1:])
    return ggml_type.row_bytes(shape[0]) * rows


# --- reading the GGUF header -----------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_MAX_KEPT_ARRAY = 1 << 16
"""Numeric arrays up to this length are kept (per-layer hyperparameters); longer ones and
string arrays (the tokenizer's vocabulary and merges) are skipped unread."""

_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


@attrs.frozen
class TensorInfo:
    """One tensor of the model as the header describes it."""

    name: str
    type: GGMLType
    shape: tuple[int, ...]
    nbytes: int

    @property
    def block(self) -> int | None:
        """``i`` for a ``blk.i.*`` tensor, else None."""
        if not self.name.startswith("blk."):
            return None
        head, _, _ = self.name[4:].partition(".")
        return int(head) if head.isdigit() else None


@attrs.frozen
class ModelLayout:
    """A model's metadata and tensor table (all shards of a split model)."""

    path: Path
    metadata: Mapping[str, Any] = attrs.field(repr=False)
    tensors: tuple[TensorInfo, ...] = attrs.field(repr=False)
    files: tuple[Path, ...] = ()

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def get(self, key: str) -> Any:
        """``<arch>.<key>`` from the metadata, or None."""
        return self.metadata.get(f"{self.architecture}.{key}")


class _Reader:
    """Little-endian reads from a mapped file, with bounds checks."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def take(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ModelLayoutError(f"{self.path}: truncated GGUF header")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def skip(self, size: int) -> None:
        if size < 0 or self.pos + size > len(self.data):
            raise ModelLayoutError(f"{self.path}: truncated GGUF header")
        self.pos += size

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` strings (a vocabulary: 10^5 of them) in a tight loop."""
        data, pos, unpack = self.data, self.pos, _U64.unpack_from
        end = len(data) - 8
        for _ in range(count):
            if pos > end:
                raise ModelLayoutError(f"{self.path}: truncated GGUF header")
            pos += 8 + unpack(data, pos)[0]
        self.pos = pos

    def string(self) -> str:
        (length,) = self.take("<Q")
        if length > len(self.data) - self.pos:
            raise ModelLayoutError(f"{self.path}: implausible string length in GGUF header")
        raw = bytes(self.data[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.take("<IQ")
            if item_kind in _SCALARS:
                size = struct.calcsize(_SCALARS[item_kind])
                if count > _MAX_KEPT_ARRAY:
                    self.skip(size * count)
                    return None
                if size * count > len(self.data) - self.pos:
                    raise ModelLayoutError(f"{self.path}: truncated GGUF header")
                values = struct.unpack_from(f"<{count}{_SCALARS[item_kind][1]}",
                                            self.data, self.pos)
                self.pos += size * count
                return list(values)
            if item_kind == _STRING:
                self.skip_strings(count)
                return None
            return [self.value(item_kind) for _ in range(count)]
        raise ModelLayoutError(f"{self.path}: unknown GGUF value type {kind}")


def _read_one(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size < 24:
                raise ModelFileError(f"{path} is not a GGUF file (too short)")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(_Reader(data, path))
    except OSError as error:
        raise ModelFileError(f"cannot read {path}: {error.strerror or error}") from None


def _parse(reader: _Reader) -> tuple[dict[str, Any], list[TensorInfo]]:
    path = reader.path
    if bytes(reader.data[:4]) != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file")
    reader.skip(4)
    (version,) = reader.take("<I")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise ModelLayoutError(f"{path}: GGUF version {version} is not supported{hint}")
    n_tensors, n_kv = reader.take("<QQ")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = reader.string()
        (kind,) = reader.take("<I")
        metadata[key] = reader.value(kind)
    tensors: list[TensorInfo] = []
    for _ in range(n_tensors):
        name = reader.string()
        (n_dims,) = reader.take("<I")
        if n_dims > 8:
            raise ModelLayoutError(f"{path}: tensor {name!r} has {n_dims} dimensions")
        shape = tuple(int(d) for d in reader.take(f"<{n_dims}Q")) if n_dims else ()
        type_id, _offset = reader.take("<IQ")
        ggml_type = GGML_TYPES.get(type_id)
        if ggml_type is None:
            raise ModelLayoutError(
                f"{path}: tensor {name!r} has ggml type {type_id}, unknown to swapd "
                "(a newer quantization?); the estimate needs its block size")
        tensors.append(TensorInfo(name, ggml_type, shape, tensor_nbytes(ggml_type, shape)))
    return metadata, tensors


def read_layout(path: str | os.PathLike[str]) -> ModelLayout:
    """The metadata and tensor table of the GGUF at ``path``; for a split model
    (``name-00001-of-00003.gguf``), of every shard. Raises :class:`ModelLayoutError`."""
    first = Path(path)
    metadata, tensors = _read_one(first)
    files = [first]
    count = metadata.get("split.count")
    if isinstance(count, int) and count > 1:
        match = _SPLIT_NAME.match(first.name)
        if match is None:
            raise ModelLayoutError(
                f"{first}: a split model ({count} files) whose name does not end in "
                "-00001-of-0000N.gguf; cannot find its other files")
        prefix = match["prefix"]
        for index in range(2, count + 1):
            shard = first.with_name(f"{prefix}-{index:05d}-of-{count:05d}.gguf")
            if not shard.is_file():
                raise ModelFileError(f"{first}: split file {shard.name} is missing")
            _, more = _read_one(shard)
            tensors += more
            files.append(shard)
    return ModelLayout(first, metadata, tuple(tensors), tuple(files))


class LayoutCache:
    """Parsed headers by file, re-read when a file's size or mtime changes.

    Parsing a header walks the tokenizer's strings (~70 ms for 300k of them), so a caller
    that estimates on every ``/v1/models`` keeps one of these. Owned by its caller; not
    thread-safe (use it from one task or thread).
    """

    def __init__(self, max_entries: int = 64) -> None:
        self._entries: dict[Path, tuple[tuple[int, int], ModelLayout]] = {}
        self._max_entries = max_entries

    def get(self, path: str | os.PathLike[str]) -> ModelLayout:
        """The layout of ``path``; raises :class:`ModelLayoutError` like :func:`read_layout`."""
        key = Path(path)
        try:
            info = key.stat()
        except OSError as error:
            raise ModelFileError(f"cannot read {key}: {error.strerror or error}") from None
        stamp = (info.st_size, info.st_mtime_ns)
        cached = self._entries.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        layout = read_layout(key)
        if len(self._entries) >= self._max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (stamp, layout)
        return layout
