"""The memory model: what llama-server will allocate for a profile (weights, KV cache,
compute, runtime), from the header and the profile's flags, the way llama.cpp sizes its
buffers. See the package docstring for the rules.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from swapd.config.flags import FlagValue, canonical_flag
from swapd.errors import ModelLayoutError
from swapd.estimate.gguf import (
    _FLOAT_TYPES,
    _TYPES_BY_NAME,
    CACHE_TYPES,
    LayoutCache,
    ModelLayout,
    read_layout,
)

if TYPE_CHECKING:
    from swapd.config import Profile



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




def format_bytes(size: int) -> str:
    """``1536 MiB`` -> ``1.50 GiB``; binary units, as llama.cpp prints them."""
    if abs(size) >= GiB:
        return f"{size / GiB:.2f} GiB"
    if abs(size) >= MiB:
        return f"{size / MiB:.1f} MiB"
    return f"{size / 1024:.1f} KiB"
