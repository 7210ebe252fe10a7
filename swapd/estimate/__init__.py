"""Will it fit? A memory estimate per profile, from the GGUF header alone.

A swap that runs out of VRAM costs a full load before it fails, and the failure arrives
as a CUDA error in the child's stderr. This module answers the question first, from the
model file's header (metadata and tensor table; no tensor data is read) and the
profile's flags, the way llama-server itself sizes its buffers:

* **weights** -- each tensor's bytes from its ggml type and shape (:data:`GGML_TYPES`),
  placed the way llama.cpp places them for ``n-gpu-layers N``: blocks ``blk.i`` with
  ``i >= n_layer + 1 - N`` go to the GPU, the output layer (``output.weight``,
  ``output_norm``, every non-``blk`` tensor except the input ones) is "layer ``n_layer``"
  and goes to the GPU once ``N >= 1``; the input embeddings (``token_embd``,
  ``position_embd``, ``token_types``, ``per_layer_token_embd``) always stay in system
  memory. A model without ``output.weight`` (tied embeddings) loads ``token_embd`` a
  second time as the output, on the GPU. ``cpu-moe``, ``n-cpu-moe``, ``n-cpu-ffn`` and
  ``override-tensor ...=CPU`` keep their tensors in system memory, as they do there.
* **KV cache** -- per layer, ``ctx cells x (head_count_kv x key_length)`` elements of
  ``cache-type-k`` plus the same for V with ``value_length`` (block types are sized by
  ggml's block bytes). The cells are llama.cpp's: ``ctx-size`` (0 or unset: the training
  context) padded to 256; with ``--no-kv-unified`` (the default once ``--parallel`` is
  set explicitly) split into ``parallel`` streams of ``pad(ctx / parallel, 256)`` cells.
  The *total* never scales with ``--parallel`` (measured). Sliding-window layers hold
  ``pad(min(ctx, window x streams' sequences + ubatch), 256)`` cells unless ``swa-full``;
  MLA models keep K only.
* **compute** -- an allowance fitted to what llama-server reserves (see
  ``docs/memory.md``): ``ubatch x 4 B x (3 n_ff + 5 n_embd)`` for activations, the
  attention mask ``cells x ubatch x 2 B`` with flash attention (``x 4 B x (n_head + 1)``
  without), and a few logits rows.
* **runtime** -- a fixed :data:`RUNTIME_RESERVE` for the GPU runtime's own context
  (CUDA context, cuBLAS workspace, kernel images), which llama.cpp's buffers never
  report; only when something is offloaded.

Architectures whose memory is not a plain KV cache (recurrent and hybrid models, DSA
indexer caches, ...) are reported as such in :attr:`Estimate.problem`, with the weights
that *are* known, never with a guessed total.

Public surface, for ``swapd check``, ``/v1/models``, ``/swapd/status`` and a swap guard:
:func:`estimate_profile` / :func:`estimate_model` -> :class:`Estimate`;
:func:`format_report`; :func:`suggest_fix`; :func:`parse_gpu_memory`;
:func:`detect_gpu_memory`; :func:`read_layout` and :class:`LayoutCache` (the header parse
of a model with a large vocabulary takes tens of milliseconds: cache it per file).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from swapd.config.flags import FlagValue, canonical_flag

if TYPE_CHECKING:
    from swapd.config import Profile

__all__ = [
    "CACHE_TYPES", "GGML_TYPES", "RUNTIME_RESERVE", "Estimate", "Fix", "GGMLType",
    "LayoutCache", "ModelFileError", "ModelLayout", "ModelLayoutError", "SlotContext",
    "TensorInfo", "detect_gpu_memory",
    "estimate_model", "estimate_profile", "format_bytes", "format_report",
    "parse_gpu_memory", "read_layout", "slot_context", "suggest_fix", "tensor_nbytes",
]

MiB = 1 << 20
GiB = 1 << 30

RUNTIME_RESERVE = 512 * MiB
"""VRAM the GPU runtime takes beyond llama.cpp's buffers (CUDA context, cuBLAS workspace,
kernel images). An allowance, not a measurement: llama.cpp's buffers do not include it and
its own ``--fit`` keeps a 1 GiB margin per device for the same reason."""

KV_PAD = 256
"""llama.cpp pads the context (and each stream of a split cache) to this many cells."""

DEFAULT_PARALLEL = 4
"""``--parallel`` unset (or -1, ``auto``): llama-server uses 4 slots and a unified cache."""

DEFAULT_UBATCH = 512
DEFAULT_BATCH = 2048


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


class ModelLayoutError(ValueError):
    """The file is not a GGUF this module can read; the message says why."""


class ModelFileError(ModelLayoutError):
    """Not a model at all: the file (or a shard) is missing, unreadable or not a GGUF.

    Unlike a header this module cannot fully parse (a newer quantization, say), this
    means llama-server cannot load it either, so a start may be refused up front.
    """


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


# --- what the flags ask for ------------------------------------------------------------


@attrs.frozen
class _Override:
    pattern: re.Pattern[str]
    on_cpu: bool


@attrs.define
class _Settings:
    """The flags that change memory use, resolved as llama-server resolves them."""

    ctx: int | None = None  # None: unset; 0: "the training context"
    gpu_layers: int | None = None  # None: all ("auto"/"all"/-1)
    gpu_layers_auto: bool = True
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"  # on/off/auto
    parallel: int | None = None  # None: auto (4 slots, unified cache)
    kv_unified: bool | None = None
    kv_unified_per_slot: int = 0
    ubatch: int = DEFAULT_UBATCH
    batch: int = DEFAULT_BATCH
    kv_offload: bool = True
    swa_full: bool = False
    fit: bool = True
    overrides: list[_Override] = attrs.Factory(list)
    mmproj: str | None = None
    mmproj_offload: bool = True
    notes: list[str] = attrs.Factory(list)
    problems: list[str] = attrs.Factory(list)

    @property
    def n_parallel(self) -> int:
        return DEFAULT_PARALLEL if self.parallel is None else self.parallel

    @property
    def unified(self) -> bool:
        if self.parallel is None:
            return True  # server.cpp: parallel auto -> 4 slots and a unified cache
        return bool(self.kv_unified)


_FFN_EXPS = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_FFN_DENSE = r"\.ffn_(up|down|gate)\."
_TRUTHY = frozenset({"on", "enabled", "true", "1"})
_FALSEY = frozenset({"off", "disabled", "false", "0"})


def _int_value(value: FlagValue) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def _last_values(flags: Mapping[str, FlagValue]) -> dict[str, FlagValue]:
    """Canonical flag name -> value as llama-server would see it (a later one wins)."""
    values: dict[str, FlagValue] = {}
    for key, value in flags.items():
        try:
            name = canonical_flag(key)
        except ValueError:
            continue
        if name == "gpu-layers":
            name = "n-gpu-layers"
        if value is None or value is False:
            continue
        values[name] = value
    return values


def _settings(flags: Mapping[str, FlagValue]) -> _Settings:
    s = _Settings()
    values = _last_values(flags)

    def number(name: str, minimum: int) -> int | None:
        if name not in values:
            return None
        number = _int_value(values[name])
        if number is None or number < minimum:
            s.problems.append(f"{name} must be a whole number of at least {minimum}, "
                              f"got {values[name]!r}")
            return None
        return number

    if "ctx-size" in values:
        s.ctx = number("ctx-size", 0)  # 0: the training context, said explicitly
    if "n-gpu-layers" in values:
        raw = values["n-gpu-layers"]
        layers = _int_value(raw)
        if isinstance(raw, str) and raw.strip() == "all":
            s.gpu_layers, s.gpu_layers_auto = None, False
        elif isinstance(raw, str) and raw.strip() == "auto":
            s.gpu_layers, s.gpu_layers_auto = None, True
        elif layers is None:
            s.problems.append(f"n-gpu-layers must be a number, 'auto' or 'all', got {raw!r}")
        else:
            s.gpu_layers = None if layers < 0 else layers
            s.gpu_layers_auto = layers == -1
    for name in ("cache-type-k", "cache-type-v"):
        if name in values:
            text = str(values[name]).strip().lower()
            if text not in CACHE_TYPES:
                s.problems.append(f"{name} {values[name]!r} is not a cache type llama-server "
                                  f"accepts ({', '.join(CACHE_TYPES)})")
            elif name == "cache-type-k":
                s.type_k = text
            else:
                s.type_v = text
    if "flash-attn" in values:
        raw = values["flash-attn"]
        text = "on" if raw is True else str(raw).strip().lower()
        if text in _TRUTHY:
            s.flash_attn = "on"
        elif text in _FALSEY:
            s.flash_attn = "off"
        elif text in ("auto", "-1"):
            s.flash_attn = "auto"
        else:
            s.problems.append(f"flash-attn must be on, off or auto, got {raw!r}")
    if "parallel" in values:
        raw = values["parallel"]
        parallel = _int_value(raw)
        if parallel == -1 or (isinstance(raw, str) and raw.strip() == "auto"):
            s.parallel = None
        elif parallel is None or parallel < 1:
            s.problems.append(f"parallel must be a whole number of at least 1, got {raw!r}")
        else:
            s.parallel = parallel
    if values.get("kv-unified") is True:
        s.kv_unified = True
    if values.get("no-kv-unified") is True:
        s.kv_unified = False
    s.kv_unified_per_slot = number("kv-unified-per-slot", 0) or 0
    s.ubatch = number("ubatch-size", 1) or DEFAULT_UBATCH
    s.batch = number("batch-size", 1) or DEFAULT_BATCH
    if values.get("no-kv-offload") is True or values.get("kv-offload") in ("off", "false"):
        s.kv_offload = False
    s.swa_full = values.get("swa-full") is True
    if str(values.get("fit", "on")).strip().lower() in _FALSEY:
        s.fit = False
    _read_overrides(s, values)
    mmproj = values.get("mmproj")
    if isinstance(mmproj, str) and mmproj.strip():
        s.mmproj = mmproj
    s.mmproj_offload = values.get("no-mmproj-offload") is not True
    for name in ("model-draft", "lora", "lora-scaled", "control-vector"):
        if name in values:
            s.notes.append(f"{name} is not counted: its memory comes on top of this estimate")
    if "tensor-split" in values or values.get("split-mode") not in (None, "layer"):
        s.notes.append("the total is summed over all GPUs; how tensor-split/split-mode "
                       "divides it between them is not modelled")
    return s


def _read_overrides(s: _Settings, values: Mapping[str, FlagValue]) -> None:
    """``override-tensor``, ``cpu-moe``, ``n-cpu-moe``, ``n-cpu-ffn``, in llama.cpp's
    order: explicit overrides first, the first matching pattern wins."""
    raw = values.get("override-tensor")
    items = list(raw) if isinstance(raw, list | tuple) else [] if raw is None else [raw]
    for item in items:
        for spec in str(item).split(","):
            pattern, sep, target = spec.partition("=")
            if not sep or not pattern:
                s.problems.append(f"override-tensor expects PATTERN=BUFFER_TYPE, got {spec!r}")
                continue
            try:
                compiled = re.compile(pattern)
            except re.error as error:
                s.notes.append(f"override-tensor pattern {pattern!r} is not understood "
                               f"here ({error}); ignored")
                continue
            on_cpu = target.strip().upper() in ("CPU", "CPU_REPACK", "CPU_MAPPED")
            s.overrides.append(_Override(compiled, on_cpu))
    if values.get("cpu-moe") is True:
        s.overrides.append(_Override(re.compile(_FFN_EXPS), True))
    for name, regex in (("n-cpu-moe", _FFN_EXPS), ("n-cpu-ffn", _FFN_DENSE)):
        if name in values:
            count = _int_value(values[name])
            if count is None or count < 0:
                s.problems.append(f"{name} must be a whole number, got {values[name]!r}")
                continue
            s.overrides += [_Override(re.compile(rf"blk\.{i}{regex}"), True)
                            for i in range(count)]


# --- what the model needs --------------------------------------------------------------

_NO_KV_ARCHS = frozenset({
    "bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert",
    "eurobert", "wavtokenizer-dec", "modern-bert", "gemma-embedding", "dream", "llada",
    "llada-moe", "rnd1", "clef", "t5encoder",
})
"""Encoders and diffusion models: llama.cpp creates no KV cache for them."""

_RECURRENT_ARCHS = frozenset({
    "mamba", "mamba2", "jamba", "falcon-h1", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7",
    "granitehybrid", "nemotron_h", "nemotron_h_moe", "plamo2", "lfm2", "lfm2moe",
    "qwen3next", "qwen35", "qwen35moe", "kimi-linear", "glm5-next", "minimax-01",
})
_RECURRENT_KEYS = (".ssm.", ".wkv.", ".rwkv.", ".time_mix", ".shortconv.",
                   ".full_attention_interval", ".linear_attention")
_OTHER_CACHE_ARCHS = {
    "deepseek32": "a DSA indexer cache", "glm-dsa": "a DSA indexer cache",
    "deepseek4": "a compressed-attention cache", "minimax-m3": "an MSA indexer cache",
    "t5": "encoder-decoder cross-attention state",
}

_SWA_PATTERNS: Mapping[str, tuple[int, bool]] = {
    # arch -> (n_pattern, dense_first) as src/models/*.cpp pass to load_swa_pattern();
    # used when the file sets <arch>.attention.sliding_window but no pattern array.
    "gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False),
    "cohere2": (4, False), "cohere2moe": (4, True), "exaone4": (4, False),
    "exaone-moe": (4, False), "olmo2": (4, False), "gpt-oss": (2, False),
    "llama4": (4, False), "afmoe": (4, False), "laguna": (4, True),
    "smallthinker": (4, True), "mellum": (4, False), "muse-glimmer": (4, False),
    "plamo3": (8, False),
}
_LLAMA4_CHUNK = 8192
_GEMMA3N_KV_LAYERS = 20


@attrs.frozen
class _Hparams:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int | None
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_k: tuple[int, ...]
    head_v: tuple[int, ...]
    is_swa: tuple[bool, ...]
    has_kv: tuple[bool, ...]
    n_swa: int
    is_mla: bool
    notes: tuple[str, ...]


def _per_layer(value: Any, n_layer: int, default: int) -> tuple[int, ...] | None:
    """A scalar or per-layer array hyperparameter as one value per layer."""
    if value is None:
        return (default,) * n_layer
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value,) * n_layer
    if isinstance(value, list) and len(value) >= n_layer and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value[:n_layer])
    return None


def _max_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list):
        ints = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        return max(ints, default=0)
    return 0


def _hparams(layout: ModelLayout) -> _Hparams | str:
    """The hyperparameters the KV cache and compute buffers depend on, or why the model
    cannot be sized."""
    arch = layout.architecture
    if arch is None:
        return "the file names no general.architecture"
    if arch in _RECURRENT_ARCHS or any(
            key.startswith(f"{arch}.") and any(mark in key for mark in _RECURRENT_KEYS)
            for key in layout.metadata):
        return (f"architecture {arch!r} keeps a recurrent (SSM/linear-attention) state; "
                "its size is not modelled here")
    if arch in _OTHER_CACHE_ARCHS:
        return (f"architecture {arch!r} keeps {_OTHER_CACHE_ARCHS[arch]} next to its KV "
                "cache; its size is not modelled here")
    n_layer = layout.get("block_count")
    n_embd = layout.get("embedding_length")
    if not isinstance(n_layer, int) or not isinstance(n_embd, int) or n_layer <= 0:
        return f"the file lacks {arch}.block_count or {arch}.embedding_length"
    notes: list[str] = []
    n_head = _per_layer(layout.get("attention.head_count"), n_layer, 0)
    if n_head is None or not any(n_head):
        return f"the file lacks a usable {arch}.attention.head_count"
    n_head_kv = _per_layer(layout.get("attention.head_count_kv"), n_layer, -1)
    if n_head_kv is None:
        return f"{arch}.attention.head_count_kv is neither a number nor one per layer"
    n_head_kv = tuple(h if kv < 0 else kv for h, kv in zip(n_head, n_head_kv, strict=True))
    first_head = next(h for h in n_head if h)
    default_k = n_embd // first_head
    head_k = _per_layer(layout.get("attention.key_length"), n_layer, default_k)
    head_v = _per_layer(layout.get("attention.value_length"), n_layer, default_k)
    if head_k is None or head_v is None:
        return f"{arch}.attention.key_length/value_length are not numbers"
    is_mla = bool(layout.get("attention.key_length_mla")) and bool(
        layout.get("attention.value_length_mla"))
    if is_mla:
        notes.append("MLA: the cache holds the compressed K only (no V)")

    n_swa = layout.get("attention.sliding_window")
    n_swa = n_swa if isinstance(n_swa, int) and not isinstance(n_swa, bool) else 0
    pattern = layout.get("attention.sliding_window_pattern")
    is_swa: tuple[bool, ...] = (False,) * n_layer
    if arch == "llama4" and (n_swa or "llama4.attention.sliding_window" not in layout.metadata):
        n_swa = _LLAMA4_CHUNK  # chunked attention of 8192, off only with a window of 0
    if n_swa > 0:
        if isinstance(pattern, list) and len(pattern) >= n_layer:
            is_swa = tuple(bool(v) for v in pattern[:n_layer])
        elif arch in _SWA_PATTERNS:
            n_pattern, dense_first = _SWA_PATTERNS[arch]
            if isinstance(pattern, int) and not isinstance(pattern, bool):
                n_pattern = pattern
            is_swa = tuple(
                n_pattern == 0 or (il % n_pattern != 0 if dense_first
                                   else il % n_pattern < n_pattern - 1)
                for il in range(n_layer))
        else:
            notes.append(f"the model declares a sliding window of {n_swa}, which llama.cpp "
                         f"does not use for {arch!r}: every layer is sized for the full "
                         "context")
    if any(is_swa):
        head_k_swa = layout.get("attention.key_length_swa")
        head_v_swa = layout.get("attention.value_length_swa")
        if isinstance(head_k_swa, int) and isinstance(head_v_swa, int):
            head_k = tuple(head_k_swa if s else k for s, k in zip(is_swa, head_k, strict=True))
            head_v = tuple(head_v_swa if s else v for s, v in zip(is_swa, head_v, strict=True))
    has_kv = (True,) * n_layer
    if arch in _NO_KV_ARCHS:
        has_kv = (False,) * n_layer
        notes.append(f"{arch!r} has no KV cache (an encoder or diffusion model)")
    elif arch == "gemma3n":
        has_kv = tuple(il < _GEMMA3N_KV_LAYERS for il in range(n_layer))
        notes.append(f"gemma3n: only the first {_GEMMA3N_KV_LAYERS} layers own a KV cache, "
                     "the others share it")

    n_ff = max(_max_int(layout.get("feed_forward_length")), 0)
    n_ff_exp = _max_int(layout.get("expert_feed_forward_length"))
    n_used = _max_int(layout.get("expert_used_count"))
    if n_ff_exp and n_used:
        shared = _max_int(layout.get("expert_shared_feed_forward_length")) or n_ff_exp
        n_shared = _max_int(layout.get("expert_shared_count"))
        n_ff = max(n_ff, n_ff_exp * n_used + shared * n_shared)
        notes.append("MoE: the compute allowance counts the active experts' width; "
                     "it was not measured on a MoE model")
    n_vocab = _max_int(layout.get("vocab_size"))
    for tensor in layout.tensors:
        if tensor.name == "token_embd.weight" and len(tensor.shape) >= 2:
            n_vocab = tensor.shape[1]
    n_ctx = layout.get("context_length")
    return _Hparams(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff or 4 * n_embd,
        n_vocab=n_vocab, n_ctx_train=n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None,
        n_head=n_head, n_head_kv=n_head_kv, head_k=head_k, head_v=head_v,
        is_swa=is_swa, has_kv=has_kv, n_swa=n_swa, is_mla=is_mla, notes=tuple(notes))


# --- the estimate ----------------------------------------------------------------------


@attrs.frozen
class Estimate:
    """What one profile needs. Byte counts; ``weights``/``kv_cache``/``compute``/``runtime``
    are what lands in GPU memory, ``host_*`` what stays in system memory.

    ``problem`` says why the model could not be (fully) sized; then ``total`` covers only
    what is known (usually the weights) and :meth:`fits` answers None.
    """

    name: str
    model: Path
    architecture: str | None = None
    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    runtime: int = 0
    host_weights: int = 0
    host_kv: int = 0
    ctx_size: int = 0
    ctx_train: int | None = None
    parallel: int = DEFAULT_PARALLEL
    kv_unified: bool = True
    n_layers: int = 0
    gpu_layers: int = 0
    output_on_gpu: bool = False
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool = True
    notes: tuple[str, ...] = ()
    problem: str | None = None
    flags: Mapping[str, FlagValue] = attrs.field(factory=dict, eq=False, repr=False)
    layout: ModelLayout | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def total(self) -> int:
        """GPU memory needed: weights + KV cache + compute + runtime."""
        return self.weights + self.kv_cache + self.compute + self.runtime

    @property
    def weights_total(self) -> int:
        return self.weights + self.host_weights

    @property
    def kv_cache_total(self) -> int:
        return self.kv_cache + self.host_kv

    @property
    def sized(self) -> bool:
        return self.problem is None

    def fits(self, gpu_memory: int) -> bool | None:
        """Whether ``total`` fits in ``gpu_memory`` bytes; None when it is not known."""
        return self.total <= gpu_memory if self.sized else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the byte counts, the settings they assume, notes and problem."""
        return {
            "weights": self.weights, "kv_cache": self.kv_cache, "compute": self.compute,
            "runtime": self.runtime, "total": self.total,
            "host_weights": self.host_weights, "host_kv_cache": self.host_kv,
            "ctx_size": self.ctx_size, "cache_type_k": self.cache_type_k,
            "cache_type_v": self.cache_type_v, "flash_attn": self.flash_attn,
            "parallel": self.parallel, "kv_unified": self.kv_unified,
            "gpu_layers": self.gpu_layers, "n_layers": self.n_layers,
            "architecture": self.architecture,
            "notes": list(self.notes), "problem": self.problem,
        }


def estimate_profile(profile: Profile, *, runtime_reserve: int = RUNTIME_RESERVE,
                     cache: LayoutCache | None = None) -> Estimate:
    """The estimate for ``profile`` (its model file and flags). Never raises for a bad or
    missing model file: that becomes :attr:`Estimate.problem`. With ``cache``, the
    model's header is parsed only when the file changed."""
    model: str | os.PathLike[str] | ModelLayout = profile.model
    if cache is not None:
        try:
            model = cache.get(profile.model)
        except ModelLayoutError as error:
            return Estimate(name=profile.name, model=profile.model, problem=str(error),
                            flags=dict(profile.flags))
    return estimate_model(model, profile.flags, name=profile.name,
                          runtime_reserve=runtime_reserve)


def estimate_model(model: str | os.PathLike[str] | ModelLayout,
                   flags: Mapping[str, FlagValue] | None = None, *, name: str = "",
                   runtime_reserve: int = RUNTIME_RESERVE) -> Estimate:
    """The estimate for a model file (or an already read :class:`ModelLayout`, so callers
    can cache layouts) started with ``flags`` (a profile's ``flags`` mapping)."""
    flags = dict(flags or {})
    if isinstance(model, ModelLayout):
        layout = model
    else:
        try:
            layout = read_layout(model)
        except ModelLayoutError as error:
            return Estimate(name=name, model=Path(model), problem=str(error), flags=flags)
    return _estimate(layout, flags, name, runtime_reserve)


def _estimate(layout: ModelLayout, flags: dict[str, FlagValue], name: str,
              runtime_reserve: int) -> Estimate:
    s = _settings(flags)
    hp = _hparams(layout)
    notes = list(s.notes)
    problems = list(s.problems)
    n_layer = hp.n_layer if isinstance(hp, _Hparams) else _block_count(layout)

    # n-gpu-layers: blocks i >= n_layer + 1 - N on the GPU; the output layer once N >= 1.
    ngl = n_layer + 1 if s.gpu_layers is None else min(s.gpu_layers, n_layer + 1)
    first_gpu_block = n_layer + 1 - ngl
    output_on_gpu = ngl >= 1
    if s.gpu_layers is None and s.gpu_layers_auto:
        notes.append("n-gpu-layers unset/auto: sized for all layers on the GPU"
                     + ("; llama-server's --fit may offload fewer to fit" if s.fit else ""))
    weights, host_weights = _place_weights(layout, s, n_layer, first_gpu_block, output_on_gpu)
    if s.mmproj:
        mmproj_bytes = _mmproj_bytes(s.mmproj, notes)
        if s.mmproj_offload:
            weights += mmproj_bytes
        else:
            host_weights += mmproj_bytes
    common: dict[str, Any] = dict(
        name=name, model=layout.path, architecture=layout.architecture,
        weights=weights, host_weights=host_weights, n_layers=n_layer,
        gpu_layers=max(0, n_layer - first_gpu_block), output_on_gpu=output_on_gpu,
        cache_type_k=s.type_k, cache_type_v=s.type_v, parallel=s.n_parallel,
        kv_unified=s.unified, flags=flags, layout=layout)
    if not isinstance(hp, _Hparams):
        problems.insert(0, hp)
    if problems:
        return Estimate(**common, notes=tuple(notes), problem="; ".join(problems))
    assert isinstance(hp, _Hparams)
    notes += hp.notes

    # flash attention: auto turns it on where the backend supports it (CPU and CUDA do),
    # and a quantized V cache requires it.
    v_quantized = s.type_v not in _FLOAT_TYPES
    if s.flash_attn == "off" and v_quantized:
        return Estimate(**common, notes=tuple(notes), problem=(
            f"cache-type-v {s.type_v} requires flash-attn on (llama-server refuses to start)"))
    flash_attn = s.flash_attn != "off"
    k_type, v_type = _TYPES_BY_NAME[s.type_k], _TYPES_BY_NAME[s.type_v]
    for il in range(n_layer):
        if not hp.has_kv[il]:
            continue
        for label, ggml_type, dim in (("k", k_type, hp.head_k[il]),
                                      ("v", v_type, hp.head_v[il])):
            if label == "v" and hp.is_mla:
                continue
            if dim % ggml_type.block_size:
                return Estimate(**common, notes=tuple(notes), problem=(
                    f"cache-type-{label} {ggml_type.name} needs the head size ({dim}) to be "
                    f"a multiple of {ggml_type.block_size} (llama-server refuses to start); "
                    "use f16 or bf16"))

    # the context: ctx-size, else the training context; padded; split into streams.
    if s.ctx:
        n_ctx = s.ctx
    elif s.ctx is None and s.kv_unified_per_slot:
        n_ctx = s.n_parallel * s.kv_unified_per_slot  # server.cpp, without -c
    elif hp.n_ctx_train:
        n_ctx = hp.n_ctx_train
        notes.append(f"ctx-size unset: sized for the training context ({n_ctx})"
                     + ("; llama-server's --fit may choose less to fit" if s.fit else ""))
    else:
        return Estimate(**common, notes=tuple(notes),
                        problem="ctx-size is unset and the model has no context_length")
    if hp.n_ctx_train and n_ctx > hp.n_ctx_train:
        notes.append(f"ctx-size {n_ctx} is above the training context {hp.n_ctx_train}: "
                     "llama-server still allocates the KV cache for all of it (slots are "
                     "capped at the training context)")
    cells_seq, n_stream = _cells(n_ctx, s)
    cells = cells_seq * n_stream
    n_seq = s.n_parallel
    n_ubatch = min(s.ubatch, s.batch, cells)
    swa_cells_seq = cells_seq
    if any(hp.is_swa) and not s.swa_full:
        window = hp.n_swa * (n_seq if s.unified else 1) + n_ubatch
        swa_cells_seq = min(cells_seq, _pad(window))
        notes.append(f"sliding-window layers: {swa_cells_seq * n_stream} cells each "
                     "(set swa-full to size them for the whole context)")

    kv_gpu = kv_host = 0
    v_padded = not flash_attn and len({hp.head_v[il] * hp.n_head_kv[il]
                                       for il in range(n_layer) if hp.has_kv[il]}) > 1
    v_width_max = max((hp.head_v[il] * hp.n_head_kv[il] for il in range(n_layer)), default=0)
    for il in range(n_layer):
        if not hp.has_kv[il]:
            continue
        layer_cells = (swa_cells_seq if hp.is_swa[il] else cells_seq) * n_stream
        size = k_type.row_bytes(hp.head_k[il] * hp.n_head_kv[il]) * layer_cells
        if not hp.is_mla:
            v_width = v_width_max if v_padded else hp.head_v[il] * hp.n_head_kv[il]
            size += v_type.row_bytes(v_width) * layer_cells
        if s.kv_offload and il >= first_gpu_block:
            kv_gpu += size
        else:
            kv_host += size
    if not s.kv_offload:
        notes.append("no-kv-offload: the KV cache stays in system memory")

    compute = _compute_allowance(hp, cells_seq, swa_cells_seq if any(hp.is_swa) else 0,
                                 n_ubatch, n_seq, flash_attn)
    offloaded = weights > 0 or kv_gpu > 0
    if not offloaded:
        notes.append("nothing is offloaded (n-gpu-layers 0): the GPU holds at most the "
                     "compute buffer")
    return Estimate(
        **common, kv_cache=kv_gpu, host_kv=kv_host, compute=compute,
        runtime=runtime_reserve if offloaded else 0, ctx_size=cells,
        ctx_train=hp.n_ctx_train, flash_attn=flash_attn, notes=tuple(notes))


def _block_count(layout: ModelLayout) -> int:
    count = layout.get("block_count")
    if isinstance(count, int) and count > 0:
        return count
    blocks = [t.block for t in layout.tensors if t.block is not None]
    return max(blocks) + 1 if blocks else 0


def _pad(n: int, to: int = KV_PAD) -> int:
    return (n + to - 1) // to * to


def _cells(n_ctx: int, s: _Settings) -> tuple[int, int]:
    """(cells per stream, streams), as llama_context sizes them."""
    n_ctx = _pad(n_ctx)
    if s.unified:
        return n_ctx, 1
    per_seq = _pad(n_ctx // s.n_parallel)
    return per_seq, s.n_parallel


@attrs.frozen
class SlotContext:
    """What one request may use, as llama-server will size it for these flags."""

    per_request: int | None  # tokens per slot; None: unknown (no ctx-size, no header)
    slots: int
    unified: bool


def slot_context(flags: Mapping[str, FlagValue], n_ctx_train: int | None) -> SlotContext:
    """The context of one slot (one request), by the rules the real llama-server shows.

    Found against the build the tests use (docs/memory.md, "The context a request
    gets"): ``--parallel`` unset or ``auto`` means 4 slots sharing a unified cache (a
    ``--no-kv-unified`` is then ignored); an explicit ``--parallel N`` splits the cache
    unless ``--kv-unified``. A set ``ctx-size`` is padded to 256, and a split one gives
    each slot ``pad(pad(ctx) / N)``; ``ctx-size`` unset or 0 gives each slot the training
    context. Every slot is capped at the training context, then at
    ``--kv-unified-per-slot`` (which, without ``ctx-size``, sizes the pool to N x it).
    """
    s = _settings(flags)
    slots = s.n_parallel
    if s.ctx:
        pool: int | None = s.ctx
    elif s.ctx is None and s.kv_unified_per_slot:
        pool = slots * s.kv_unified_per_slot
    else:
        pool = None  # the training context, per slot
    if pool is not None:
        per_request: int | None = _cells(pool, s)[0]
        if n_ctx_train and per_request is not None:
            per_request = min(per_request, n_ctx_train)
    else:
        per_request = n_ctx_train
    if s.kv_unified_per_slot and per_request is not None:
        per_request = min(per_request, s.kv_unified_per_slot)
    return SlotContext(per_request, slots, s.unified)


_INPUT_TENSORS = ("token_embd.", "position_embd.", "token_types.", "per_layer_token_embd.")


def _place_weights(layout: ModelLayout, s: _Settings, n_layer: int, first_gpu_block: int,
                   output_on_gpu: bool) -> tuple[int, int]:
    """(GPU bytes, system-memory bytes) of the weights."""
    gpu = host = 0
    tied = not any(t.name == "output.weight" for t in layout.tensors)
    for tensor in layout.tensors:
        if tensor.name.startswith(_INPUT_TENSORS):
            host += tensor.nbytes
            if tied and tensor.name == "token_embd.weight" and output_on_gpu:
                gpu += tensor.nbytes  # loaded again as the output layer
            continue
        block = tensor.block
        on_gpu = output_on_gpu if block is None or block >= n_layer else block >= first_gpu_block
        if on_gpu:
            for override in s.overrides:
                if override.pattern.search(tensor.name):
                    on_gpu = not override.on_cpu
                    break
        if on_gpu:
            gpu += tensor.nbytes
        else:
            host += tensor.nbytes
    return gpu, host


def _mmproj_bytes(path: str, notes: list[str]) -> int:
    try:
        size = read_layout(path).nbytes
    except ModelLayoutError as error:
        notes.append(f"mmproj not counted: {error}")
        return 0
    notes.append(f"includes the mmproj weights ({format_bytes(size)}); "
                 "its image-encoder compute buffer is not counted")
    return size


COMPUTE_FFN_FACTOR = 3
COMPUTE_EMBD_FACTOR = 5
COMPUTE_FIXED = 1 * MiB
"""Graph inputs and small tensors; keeps the allowance at or above every measurement."""


def _compute_allowance(hp: _Hparams, cells_seq: int, swa_cells_seq: int, n_ubatch: int,
                       n_seq: int, flash_attn: bool) -> int:
    """The compute-buffer allowance; see ``docs/memory.md`` for the measurements."""
    activations = n_ubatch * 4 * (COMPUTE_FFN_FACTOR * hp.n_ff + COMPUTE_EMBD_FACTOR * hp.n_embd)
    kv_seen = cells_seq + swa_cells_seq
    if flash_attn:
        attention = kv_seen * n_ubatch * 2  # the f16 mask
    else:
        attention = kv_seen * n_ubatch * 4 * (max(hp.n_head) + 1)  # f32 KQ + mask
    logits = n_seq * hp.n_vocab * 4
    return activations + attention + logits + COMPUTE_FIXED


# --- fits, fixes, reports --------------------------------------------------------------


@attrs.frozen
class Fix:
    """Flag changes that make a profile fit, each option with its estimate."""

    options: tuple[tuple[Mapping[str, FlagValue], Estimate], ...]
    text: str

    def __str__(self) -> str:
        return self.text


def suggest_fix(estimate: Estimate, gpu_memory: int) -> Fix | None:
    """Up to three ways to bring ``estimate`` under ``gpu_memory``: a quantized KV cache
    at the same context, a smaller context, both, or (when the weights alone are too
    big) fewer GPU layers. None when it fits or cannot be sized."""
    if not estimate.sized or estimate.layout is None or estimate.total <= gpu_memory:
        return None
    layout, flags = estimate.layout, dict(estimate.flags)
    reserve = estimate.runtime or RUNTIME_RESERVE

    def with_changes(changes: Mapping[str, FlagValue]) -> Estimate:
        return _estimate(layout, _merge(flags, changes), estimate.name, reserve)

    options: list[tuple[Mapping[str, FlagValue], Estimate]] = []
    # a quantized V cache needs flash attention; "auto" turns it on, "off" must change
    needs_fa: dict[str, FlagValue] = {} if estimate.flash_attn else {"flash-attn": "on"}
    cache_steps: list[dict[str, FlagValue]] = []
    for cache in ("q8_0", "q4_0"):
        step: dict[str, FlagValue] = {
            f"cache-type-{part}": cache for part, current in (
                ("k", estimate.cache_type_k), ("v", estimate.cache_type_v))
            if _cache_bits(cache) < _cache_bits(current)}
        if any(key == "cache-type-v" for key in step):
            step.update(needs_fa)
        if step:
            cache_steps.append(step)
    for changes in cache_steps:
        candidate = with_changes(changes)
        if candidate.sized and candidate.total <= gpu_memory:
            options.append((changes, candidate))
            break
    smaller = _largest_ctx(with_changes, {}, estimate.ctx_size, gpu_memory)
    if smaller is not None:
        options.append(smaller)
    if not options and cache_steps:
        both = _largest_ctx(with_changes, cache_steps[0], estimate.ctx_size, gpu_memory)
        if both is not None:
            options.append(both)
    if not options:
        layers = _most_layers(with_changes, estimate.n_layers, gpu_memory)
        if layers is not None:
            options.append(layers)
    if not options:
        return Fix((), f"nothing swapd tries fits in {format_bytes(gpu_memory)} (the weights "
                       f"alone need {format_bytes(estimate.weights)} on the GPU, the runtime "
                       f"{format_bytes(reserve)}); use a smaller quantization or a bigger GPU")
    texts = [f"{_show_changes(changes)} -> {format_bytes(e.total)}"
             + (" (the other layers run on the CPU, slower)" if "n-gpu-layers" in changes
                else "")
             for changes, e in options]
    return Fix(tuple(options), " or ".join(texts))


def _merge(flags: Mapping[str, FlagValue], changes: Mapping[str, FlagValue]) -> dict[
        str, FlagValue]:
    """``flags`` with ``changes`` applied, replacing any spelling of the same flag."""
    changed = {canonical_flag(key) for key in changes}
    kept: dict[str, FlagValue] = {}
    for key, value in flags.items():
        try:
            name = canonical_flag(key)
        except ValueError:
            name = key
        if name == "gpu-layers":
            name = "n-gpu-layers"
        if name not in changed:
            kept[key] = value
    return {**kept, **changes}


def _cache_bits(name: str) -> float:
    t = _TYPES_BY_NAME[name]
    return t.type_size * 8 / t.block_size


def _largest_ctx(with_changes: Any, base: Mapping[str, FlagValue], ctx: int,
                 gpu_memory: int) -> tuple[Mapping[str, FlagValue], Estimate] | None:
    """The largest context (a multiple of 1024, at least 2048) that fits, or None."""
    step = 1024
    return _largest_fitting(
        2, ctx // step - (1 if ctx % step == 0 else 0),
        lambda n: {**base, "ctx-size": n * step}, with_changes, gpu_memory)


def _most_layers(with_changes: Any, n_layers: int,
                 gpu_memory: int) -> tuple[Mapping[str, FlagValue], Estimate] | None:
    return _largest_fitting(1, n_layers, lambda n: {"n-gpu-layers": n}, with_changes,
                            gpu_memory)


def _largest_fitting(low: int, high: int, changes_for: Any, with_changes: Any,
                     gpu_memory: int) -> tuple[Mapping[str, FlagValue], Estimate] | None:
    """Binary search for the largest n in [low, high] whose changes fit (estimates grow
    with n), with those changes and their estimate; None if even ``low`` does not fit."""
    best: tuple[Mapping[str, FlagValue], Estimate] | None = None
    while low <= high:
        middle = (low + high) // 2
        changes: dict[str, FlagValue] = changes_for(middle)
        candidate = with_changes(changes)
        if candidate.sized and candidate.total <= gpu_memory:
            best, low = (changes, candidate), middle + 1
        else:
            high = middle - 1
    return best


def _show_changes(changes: Mapping[str, FlagValue]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in changes.items())


def format_bytes(size: int) -> str:
    """``1536 MiB`` -> ``1.50 GiB``; binary units, as llama.cpp prints them."""
    if abs(size) >= GiB:
        return f"{size / GiB:.2f} GiB"
    if abs(size) >= MiB:
        return f"{size / MiB:.1f} MiB"
    return f"{size / 1024:.1f} KiB"


def format_report(estimates: Iterable[Estimate],
                  gpu_memory: int | None = None) -> tuple[str, bool]:
    """A few lines per profile, and whether every sized profile fits in ``gpu_memory``
    (True without a budget; profiles that cannot be sized never count as not fitting)::

        qwen: 62/62 layers on GPU, ctx 65536 (q8_0/f16 cache)
          weights 15.42 GiB + KV 4.25 GiB + compute 612.0 MiB + runtime 512.0 MiB = 20.78 GiB
          fits in 24.00 GiB, 3.22 GiB to spare
    """
    lines: list[str] = []
    all_fit = True
    for e in estimates:
        if e.problem is not None and e.weights_total == 0:
            lines += [f"{e.name}: cannot estimate: {e.problem}"]
            continue
        if e.problem is not None:
            lines += [f"{e.name}: cannot estimate: {e.problem}",
                      f"  weights alone: {format_bytes(e.weights)} on the GPU"
                      + (f", {format_bytes(e.host_weights)} in system memory"
                         if e.host_weights else "")]
            continue
        layers = f"{e.gpu_layers}/{e.n_layers} layers on GPU"
        lines.append(f"{e.name}: {layers}, ctx {e.ctx_size} "
                     f"({e.cache_type_k}/{e.cache_type_v} cache"
                     + ("" if e.flash_attn else ", no flash-attn") + ")")
        lines.append(f"  weights {format_bytes(e.weights)} + KV {format_bytes(e.kv_cache)} + "
                     f"compute {format_bytes(e.compute)} + runtime {format_bytes(e.runtime)}"
                     f" = {format_bytes(e.total)}")
        if e.host_weights or e.host_kv:
            lines.append(f"  in system memory: weights {format_bytes(e.host_weights)}"
                         + (f" + KV {format_bytes(e.host_kv)}" if e.host_kv else ""))
        if gpu_memory is not None:
            if e.total <= gpu_memory:
                lines.append(f"  fits in {format_bytes(gpu_memory)}, "
                             f"{format_bytes(gpu_memory - e.total)} to spare")
            else:
                all_fit = False
                lines.append(f"  does NOT fit in {format_bytes(gpu_memory)}: "
                             f"{format_bytes(e.total - gpu_memory)} over")
                fix = suggest_fix(e, gpu_memory)
                if fix is not None:
                    lines.append(f"  fix: {fix.text}")
        lines += [f"  note: {note}" for note in e.notes]
    return "\n".join(lines), all_fit


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
