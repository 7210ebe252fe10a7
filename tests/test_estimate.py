"""The memory estimate (``swapd/estimate/``) against ggml's tables and the real server.

* The ggml type table is checked against the ``gguf`` package's ``GGML_QUANT_SIZES``.
* The header reader is checked against ``gguf.GGUFReader`` on a generated model.
* ``@pytest.mark.real_llama`` tests load generated models of several shapes (GQA, MHA,
  head sizes 32/64/128, f32 and quantized weights) in the real llama-server with
  different ``--ctx-size``/``--cache-type-k/v``/``--parallel``/``--kv-unified`` settings,
  read the buffer sizes it prints while loading (``-lv 4``; the server is killed as soon
  as its compute buffers are reserved, before it listens), and require the estimate's
  weights and KV cache within 5 % and the compute allowance between 100 % and 150 % of
  what it printed (it is an allowance: never below). This build has no GPU, so
  everything lands in CPU buffers: the estimate is asked for ``n-gpu-layers: 0`` and its
  ``host_*`` figures are compared.
* Everything else (layer placement, SWA, MLA, unsupported architectures, fixes, the
  report, ``nvidia-smi``) runs on synthetic layouts, no files needed.

Run ``python -m tests.test_estimate`` to print the accuracy table of ``docs/memory.md``.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import gguf
import numpy as np
import pytest

from swapd.config import parse_config
from swapd.config.flags import FlagValue
from swapd.estimate import (
    CACHE_TYPES,
    GGML_TYPES,
    RUNTIME_RESERVE,
    Estimate,
    LayoutCache,
    ModelLayout,
    ModelLayoutError,
    TensorInfo,
    detect_gpu_memory,
    estimate_model,
    estimate_profile,
    format_bytes,
    format_report,
    parse_gpu_memory,
    read_layout,
    slot_context,
    suggest_fix,
    tensor_nbytes,
)
from tests.support import llama_build
from tests.support.tiny_gguf import write_tiny_llama

MiB = 1 << 20
GiB = 1 << 30
LOAD_DEADLINE_S = 60.0
"""Turns a hung load into a failure; each load here takes well under a second."""

# --- ggml types -------------------------------------------------------------------------

STALE_IN_GGUF_PY = {gguf.GGMLQuantizationType.Q8_1: (32, 36)}
"""gguf-py still sizes Q8_1 blocks as two floats + 32 bytes (40); ggml's block_q8_1 is
two halves + 32 bytes, ``static_assert``-ed to 36 in ggml-common.h."""


@pytest.mark.parametrize("qtype", list(gguf.GGML_QUANT_SIZES), ids=lambda t: t.name)
def test_type_table_matches_gguf(qtype: gguf.GGMLQuantizationType) -> None:
    ours = GGML_TYPES[int(qtype)]
    expected = STALE_IN_GGUF_PY.get(qtype, gguf.GGML_QUANT_SIZES[qtype])
    assert (ours.block_size, ours.type_size) == expected
    assert ours.name.lower() == qtype.name.lower()


def test_type_table_has_nothing_gguf_lacks_but_q2_0() -> None:
    known = {int(t) for t in gguf.GGML_QUANT_SIZES}
    # Q2_0 (64 elements: one half + 16 bytes) is newer than gguf 0.19.
    assert {i: t.name for i, t in GGML_TYPES.items() if i not in known} == {42: "q2_0"}


@pytest.mark.parametrize(("name", "elements", "nbytes"), [
    ("f32", 4096, 16384), ("f16", 4096, 8192), ("bf16", 4096, 8192),
    ("q8_0", 4096, 4352), ("q4_0", 4096, 2304), ("q4_1", 4096, 2560),
    ("q5_0", 4096, 2816), ("q5_1", 4096, 3072), ("iq4_nl", 4096, 2304),
    ("q4_K", 4096, 2304), ("q6_K", 4096, 3360), ("mxfp4", 4096, 2176),
])
def test_row_bytes(name: str, elements: int, nbytes: int) -> None:
    ggml_type = next(t for t in GGML_TYPES.values() if t.name == name)
    assert ggml_type.row_bytes(elements) == nbytes
    assert tensor_nbytes(ggml_type, (elements, 3)) == 3 * nbytes


def test_every_cache_type_is_a_ggml_type() -> None:
    names = {t.name for t in GGML_TYPES.values()}
    assert set(CACHE_TYPES) <= names


# --- the header reader ------------------------------------------------------------------


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("estimate-models")


@attrs.frozen
class Shape:
    label: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    context_length: int
    weights: str = "f32"

    def describe(self) -> str:
        head = self.n_embd // self.n_head
        gqa = "MHA" if self.n_head == self.n_head_kv else f"GQA {self.n_head}:{self.n_head_kv}"
        return (f"{self.n_layers}L x {self.n_embd}, {gqa}, head {head}, {self.weights}, "
                f"train ctx {self.context_length}")


SHAPES = {
    "A": Shape("A", 4, 256, 8, 2, 8192),
    "B": Shape("B", 6, 384, 6, 2, 4096),
    "C": Shape("C", 6, 512, 8, 8, 4096),
    "D": Shape("D", 2, 512, 4, 1, 8192),
    "A8": Shape("A8", 4, 256, 8, 2, 8192, weights="q8_0"),
    "A4": Shape("A4", 4, 256, 8, 2, 8192, weights="q4_0"),
}


def model_file(directory: Path, shape: Shape) -> Path:
    path = directory / f"{shape.label}.gguf"
    if path.exists():
        return path
    if shape.weights == "f32":
        return write_tiny_llama(path, n_layers=shape.n_layers, n_embd=shape.n_embd,
                                n_head=shape.n_head, n_head_kv=shape.n_head_kv,
                                context_length=shape.context_length, seed=7)
    base = model_file(directory, attrs.evolve(shape, label=f"{shape.label}-f32",
                                              weights="f32"))
    return quantized_copy(base, path, gguf.GGMLQuantizationType[shape.weights.upper()])


def quantized_copy(source: Path, target: Path, qtype: gguf.GGMLQuantizationType) -> Path:
    """``source`` with every 2-D weight quantized to ``qtype`` (norms stay f32)."""
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(target, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if data.ndim == 2 and data.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            writer.add_tensor(tensor.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_reader_agrees_with_gguf(shapes_dir: Path) -> None:
    path = model_file(shapes_dir, SHAPES["A4"])
    layout = read_layout(path)
    reference = gguf.GGUFReader(path)
    assert [(t.name, t.shape, t.type.id, t.nbytes) for t in layout.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_bytes))
        for t in reference.tensors]
    for key, field in reference.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml."):
            continue
        assert layout.metadata[key] == pytest.approx(field.contents()), key
    assert layout.architecture == "llama"
    # the whole tensor table in the file: the data after the header, minus alignment
    data_bytes = path.stat().st_size - reference.data_offset
    assert 0 <= data_bytes - layout.nbytes < 32 * len(layout.tensors)


def test_reader_reads_every_shard(tmp_path: Path) -> None:
    source = read_layout(write_tiny_llama(tmp_path / "one.gguf", n_layers=3))
    writer = gguf.GGUFWriter(tmp_path / "split.gguf", "llama", split_max_tensors=12)
    reader = gguf.GGUFReader(tmp_path / "one.gguf")
    for name in ("llama.block_count", "llama.embedding_length", "llama.context_length"):
        writer.add_uint32(name, reader.fields[name].contents())
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shards = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(shards) > 2
    layout = read_layout(shards[0])
    assert layout.files == tuple(shards)
    assert layout.nbytes == source.nbytes
    assert [t.name for t in layout.tensors] == [t.name for t in source.tensors]
    shards[-1].unlink()
    with pytest.raises(ModelLayoutError, match="is missing"):
        read_layout(shards[0])


@pytest.mark.parametrize(("content", "message"), [
    (b"", "too short"), (b"GGML" + bytes(40), "not a GGUF"),
    (b"GGUF" + (1).to_bytes(4, "little") + bytes(40), "version 1"),
    (b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + bytes(12),
     "truncated"),
], ids=["empty", "magic", "version", "truncated"])
def test_reader_refuses_what_it_cannot_read(tmp_path: Path, content: bytes,
                                            message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLayoutError, match=message):
        read_layout(path)
    assert message in (estimate_model(path).problem or "")


def test_missing_model_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    estimate = estimate_model(tmp_path / "nope.gguf", name="gone")
    assert not estimate.sized and "cannot read" in (estimate.problem or "")
    assert estimate.fits(GiB) is None
    text, all_fit = format_report([estimate], GiB)
    assert text.startswith("gone: cannot estimate: cannot read") and all_fit


# --- the real llama-server ----------------------------------------------------------------

_BUFFER = re.compile(
    r"(?P<device>\S+)\s+(?P<kind>model|KV|compute|output) buffer size =\s+(?P<mib>[\d.]+) MiB")
_CELLS = re.compile(r"llama_kv_cache: size = .*?\(\s*(\d+) cells, .*?\d+/(\d+) seqs\)")
"""``(  512 cells,   4 layers,  8/8 seqs)``: cells per stream, then sequences/streams."""


@attrs.frozen
class Measured:
    weights: float
    kv: float
    compute: float
    cells: int
    log: str


def measure(binary: Path, model: Path, args: Sequence[str]) -> Measured:
    """Load ``model`` with ``args``, read the buffer sizes, kill it once they are out."""
    argv = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", "0",
            "-lv", "4", "--no-warmup", *args]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    assert process.stderr is not None
    output = b""
    deadline = time.monotonic() + LOAD_DEADLINE_S
    try:
        while b"sched_reserve: graph" not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no buffer lines within {LOAD_DEADLINE_S} s:\n{output!r}"
            ready, _, _ = select.select([process.stderr], [], [], remaining)
            if ready:
                chunk = os.read(process.stderr.fileno(), 1 << 16)
                if not chunk:
                    break  # it exited
                output += chunk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=LOAD_DEADLINE_S)
        process.stderr.close()
    log = output.decode(errors="replace")
    sizes: dict[str, float] = {}
    for match in _BUFFER.finditer(log):
        if match["device"] == "CPU_REPACK":
            continue  # repacked copies of mapped tensors: host RAM only, on top of the map
        sizes[match["kind"]] = sizes.get(match["kind"], 0.0) + float(match["mib"]) * MiB
    cells = _CELLS.search(log)
    assert cells is not None and {"model", "KV", "compute"} <= set(sizes), log[-3000:]
    return Measured(sizes["model"], sizes["KV"], sizes["compute"],
                    int(cells[1]) * int(cells[2]), log)


def to_flags(args: Sequence[str]) -> dict[str, FlagValue]:
    """llama-server arguments as a profile's ``flags`` mapping."""
    flags: dict[str, FlagValue] = {}
    items = list(args)
    while items:
        name = items.pop(0).lstrip("-")
        if items and not items[0].startswith("-"):
            flags[name] = items.pop(0)
        else:
            flags[name] = True
    return flags


CASES: list[tuple[str, tuple[str, ...]]] = [
    ("A", ("-c", "2048")),
    ("A", ()),  # no --ctx-size: the training context (8192)
    ("A", ("-c", "4096", "-ctk", "q8_0", "-ctv", "q8_0")),
    ("A", ("-c", "4096", "-ctk", "q4_0", "-ctv", "q4_0")),
    ("A", ("-c", "3000")),  # padded to 3072 cells
    ("A", ("-c", "16384")),  # above the training context: allocated anyway
    ("A", ("-c", "4096", "-np", "1")),
    ("A", ("-c", "4096", "-np", "8")),  # explicit --parallel: split cache, 8 x 512
    ("A", ("-c", "1000", "-np", "8")),  # 8 streams of pad(1024/8, 256) = 2048 cells
    ("A", ("-c", "5000", "-np", "3", "-kvu")),
    ("A", ("-c", "4096", "-fa", "off")),
    ("B", ("-c", "4096",)),
    ("B", ("-c", "4096", "-ctk", "q8_0")),  # quantized K, f16 V
    ("B", ("-c", "2048", "-ctk", "q4_0", "-ctv", "q4_0", "-ub", "256")),
    ("C", ("-c", "4096",)),
    ("C", ("-c", "4096", "-ctk", "q8_0", "-ctv", "q8_0", "-np", "2")),
    ("D", ("-c", "8192", "-ctk", "q8_0", "-ctv", "q8_0")),
    ("A8", ("-c", "2048",)),
    ("A4", ("-c", "2048",)),
]


@attrs.frozen
class Row:
    shape: Shape
    args: tuple[str, ...]
    estimate: Estimate
    measured: Measured


def accuracy_rows(binary: Path, directory: Path,
                  cases: Sequence[tuple[str, tuple[str, ...]]] = CASES) -> Iterator[Row]:
    for label, args in cases:
        shape = SHAPES[label]
        model = model_file(directory, shape)
        # A CPU build keeps everything in system memory, as n-gpu-layers 0 would.
        estimate = estimate_model(model, {**to_flags(args), "n-gpu-layers": 0})
        yield Row(shape, args, estimate, measure(binary, model, args))


@pytest.mark.real_llama
def test_estimate_matches_real_llama_server(llama_server_bin: Path, shapes_dir: Path) -> None:
    failures = []
    for row in accuracy_rows(llama_server_bin, shapes_dir):
        e, m = row.estimate, row.measured
        assert e.sized, e.problem
        assert e.weights == 0 and e.kv_cache == 0 and e.runtime == 0
        checks = {
            "weights": (e.host_weights / m.weights, 0.95, 1.05),
            "kv": (e.host_kv / m.kv, 0.95, 1.05),
            "compute": (e.compute / m.compute, 1.0, 1.5),  # an allowance: never below
        }
        for what, (ratio, low, high) in checks.items():
            if not low <= ratio <= high:
                failures.append(f"{row.shape.label} {' '.join(row.args)}: {what} "
                                f"estimated/measured = {ratio:.3f}")
        if e.ctx_size != m.cells:
            failures.append(f"{row.shape.label} {' '.join(row.args)}: {e.ctx_size} cells "
                            f"estimated, {m.cells} allocated")
    assert not failures, "\n".join(failures)


@pytest.mark.real_llama
def test_parallel_does_not_scale_the_kv_cache(llama_server_bin: Path,
                                              shapes_dir: Path) -> None:
    """The total cache is ``--ctx-size`` whatever ``--parallel`` is: unified, it is one
    pool shared by the slots; split (``--no-kv-unified``, the default once ``-np`` is
    given), each slot gets ctx/parallel cells."""
    model = model_file(shapes_dir, SHAPES["A"])
    sizes = set()
    for args in (("-c", "4096", "-np", "1"), ("-c", "4096", "-np", "4", "-kvu"),
                 ("-c", "4096", "-np", "4", "--no-kv-unified"), ("-c", "4096", "-np", "8")):
        measured = measure(llama_server_bin, model, args)
        sizes.add(measured.kv)
        estimate = estimate_model(model, to_flags(args))
        assert estimate.kv_cache_total == pytest.approx(measured.kv, rel=0.01)
    assert len(sizes) == 1


# --- synthetic layouts ------------------------------------------------------------------

F16 = GGML_TYPES[1]
F32 = GGML_TYPES[0]
Q4_K = GGML_TYPES[12]
Q6_K = GGML_TYPES[14]


def tensor(name: str, shape: tuple[int, ...], ggml_type: Any = F16) -> TensorInfo:
    return TensorInfo(name, ggml_type, shape, tensor_nbytes(ggml_type, shape))


def synthetic(arch: str = "llama", *, n_layer: int = 32, n_embd: int = 4096,
              n_head: int | list[int] = 32, n_head_kv: int | list[int] = 8,
              n_ff: int = 14336, n_vocab: int = 128256, ctx: int = 131072,
              tied: bool = False, weight_type: Any = Q4_K,
              extra: Mapping[str, Any] | None = None,
              block_tensors: Mapping[str, tuple[int, ...]] | None = None) -> ModelLayout:
    """A Llama-3-8B-like layout (by default), with only the metadata the estimate reads."""
    metadata: dict[str, Any] = {
        "general.architecture": arch, f"{arch}.block_count": n_layer,
        f"{arch}.embedding_length": n_embd, f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv, f"{arch}.feed_forward_length": n_ff,
        f"{arch}.context_length": ctx, **(extra or {}),
    }
    head = n_embd // (n_head if isinstance(n_head, int) else n_head[0])
    kv = head * (n_head_kv if isinstance(n_head_kv, int) else max(n_head_kv))
    tensors = [tensor("token_embd.weight", (n_embd, n_vocab), Q6_K)]
    for i in range(n_layer):
        shapes = block_tensors or {
            "attn_q": (n_embd, n_embd), "attn_k": (n_embd, kv), "attn_v": (n_embd, kv),
            "attn_output": (n_embd, n_embd), "ffn_gate": (n_embd, n_ff),
            "ffn_up": (n_embd, n_ff), "ffn_down": (n_ff, n_embd),
        }
        tensors += [tensor(f"blk.{i}.{name}.weight", shape, weight_type)
                    for name, shape in shapes.items()]
        tensors.append(tensor(f"blk.{i}.attn_norm.weight", (n_embd,), F32))
    tensors.append(tensor("output_norm.weight", (n_embd,), F32))
    if not tied:
        tensors.append(tensor("output.weight", (n_embd, n_vocab), Q6_K))
    return ModelLayout(Path(f"/models/{arch}.gguf"), metadata, tuple(tensors))


def by_name(layout: ModelLayout, *prefixes: str) -> int:
    return sum(t.nbytes for t in layout.tensors if t.name.startswith(prefixes))


def test_llama3_8b_kv_cache_is_the_known_figure() -> None:
    # 32 layers x 8 KV heads x 128 x 2 (K and V) x 2 bytes = 128 KiB per token.
    estimate = estimate_model(synthetic(), {"ctx-size": 8192, "n-gpu-layers": 99})
    assert estimate.kv_cache == 8192 * 128 * 1024 == GiB
    q8 = estimate_model(synthetic(), {"ctx-size": 8192, "cache-type-k": "q8_0",
                                      "cache-type-v": "q8_0"})
    assert q8.kv_cache == GiB * 34 // 64
    assert q8.flash_attn


@pytest.mark.parametrize(("ngl", "blocks", "output"), [
    (0, 0, False), (1, 0, True), (2, 1, True), (32, 31, True), (33, 32, True),
    (99, 32, True), (-1, 32, True), ("all", 32, True), ("auto", 32, True), ("16", 15, True),
])
def test_gpu_layers_place_blocks_like_llama_cpp(ngl: FlagValue, blocks: int,
                                               output: bool) -> None:
    layout = synthetic()
    estimate = estimate_model(layout, {"n-gpu-layers": ngl, "c": 4096})
    on_gpu = tuple(f"blk.{i}." for i in range(32 - blocks, 32))
    expected = (by_name(layout, *on_gpu) if blocks else 0) + (
        by_name(layout, "output") if output else 0)
    assert (estimate.gpu_layers, estimate.output_on_gpu) == (blocks, output)
    assert estimate.weights == expected
    assert estimate.weights + estimate.host_weights == layout.nbytes
    assert estimate.kv_cache == 4096 * 128 * 1024 * blocks // 32
    assert estimate.kv_cache_total == 4096 * 128 * 1024
    assert estimate.runtime == (RUNTIME_RESERVE if blocks or output else 0)


def test_input_embeddings_stay_in_system_memory_and_tied_ones_load_twice() -> None:
    untied = estimate_model(synthetic(), {"c": 4096})
    assert untied.host_weights == by_name(synthetic(), "token_embd")
    tied_layout = synthetic(tied=True)
    tied = estimate_model(tied_layout, {"c": 4096})
    embd = by_name(tied_layout, "token_embd")
    assert tied.host_weights == embd
    assert tied.weights == tied_layout.nbytes - embd + embd  # again, as the output


def test_cpu_moe_and_overrides_keep_experts_in_system_memory() -> None:
    experts = {"ffn_gate_exps": (2048, 768, 64), "ffn_up_exps": (2048, 768, 64),
               "ffn_down_exps": (768, 2048, 64), "attn_q": (2048, 2048)}
    layout = synthetic("qwen3moe", n_layer=4, n_embd=2048, block_tensors=experts,
                       extra={"qwen3moe.expert_feed_forward_length": 768,
                              "qwen3moe.expert_used_count": 8})
    exps = by_name(layout, *(f"blk.{i}.ffn_" for i in range(4)))
    full = estimate_model(layout, {"c": 4096})
    moves: list[dict[str, FlagValue]] = [
        {"cpu-moe": True}, {"n-cpu-moe": 4}, {"ot": r"\.ffn_.*_exps\.=CPU"},
        {"override-tensor": [r"exps=CPU"]}]
    for flags in moves:
        moved = estimate_model(layout, {"c": 4096, **flags})
        assert moved.weights == full.weights - exps, flags
        assert moved.host_weights == full.host_weights + exps, flags
    half = estimate_model(layout, {"c": 4096, "n-cpu-moe": 2})
    assert half.weights == full.weights - exps // 2
    assert any("MoE" in note for note in full.notes)


def test_per_layer_kv_heads_and_explicit_head_sizes() -> None:
    layout = synthetic("deci", n_layer=4, n_head=[32, 32, 32, 32], n_head_kv=[8, 0, 4, 8],
                       extra={"deci.attention.key_length": 192,
                              "deci.attention.value_length": 128})
    estimate = estimate_model(layout, {"c": 1024})
    per_token = sum(kv * (192 + 128) * 2 for kv in (8, 0, 4, 8))
    assert estimate.kv_cache == per_token * 1024


def test_mla_keeps_k_only() -> None:
    layout = synthetic("deepseek2", n_layer=2, n_head=16, n_head_kv=1,
                       extra={"deepseek2.attention.key_length": 576,
                              "deepseek2.attention.value_length": 512,
                              "deepseek2.attention.key_length_mla": 192,
                              "deepseek2.attention.value_length_mla": 128})
    estimate = estimate_model(layout, {"c": 2048})
    assert estimate.kv_cache == 2 * 2048 * 576 * 2
    assert any("MLA" in note for note in estimate.notes)


def test_sliding_window_layers_hold_the_window() -> None:
    layout = synthetic("gemma2", n_layer=4, n_embd=2304, n_head=8, n_head_kv=4,
                       extra={"gemma2.attention.sliding_window": 4096,
                              "gemma2.attention.key_length": 256,
                              "gemma2.attention.value_length": 256})
    per_cell = 4 * 256 * 2 * 2  # one layer: 4 KV heads x 256 x (K + V) x f16
    swa = estimate_model(layout, {"c": 32768})  # 4 slots, unified: 4 x 4096 + 512
    assert swa.kv_cache == per_cell * (2 * 32768 + 2 * (4 * 4096 + 512))
    full = estimate_model(layout, {"c": 32768, "swa-full": True})
    assert full.kv_cache == per_cell * 4 * 32768
    one_slot = estimate_model(layout, {"c": 32768, "np": 1})
    assert one_slot.kv_cache == per_cell * (2 * 32768 + 2 * (4096 + 512))
    pattern = synthetic("step35", n_layer=4, n_embd=2304, n_head=8, n_head_kv=4,
                        extra={"step35.attention.sliding_window": 512,
                               "step35.attention.sliding_window_pattern": [1, 1, 1, 0],
                               "step35.attention.key_length": 256,
                               "step35.attention.value_length": 256})
    assert estimate_model(pattern, {"c": 32768}).kv_cache == per_cell * (
        32768 + 3 * (4 * 512 + 512))


def test_unknown_sliding_window_is_sized_full_and_said() -> None:
    layout = synthetic("llama", extra={"llama.attention.sliding_window": 4096})
    estimate = estimate_model(layout, {"c": 8192})
    assert estimate.kv_cache == 8192 * 128 * 1024
    assert any("sliding window" in note for note in estimate.notes)


@pytest.mark.parametrize("arch", ["mamba", "rwkv7", "jamba", "qwen3next", "granitehybrid"])
def test_recurrent_architectures_are_reported_not_guessed(arch: str) -> None:
    estimate = estimate_model(synthetic(arch), {"c": 4096}, name="ssm")
    assert not estimate.sized and "recurrent" in (estimate.problem or "")
    assert estimate.kv_cache == 0 and estimate.weights > 0
    text, all_fit = format_report([estimate], 24 * GiB)
    assert "cannot estimate" in text and "weights alone" in text and all_fit


def test_ssm_keys_mark_an_unknown_architecture_unsupported() -> None:
    layout = synthetic("newhybrid", extra={"newhybrid.ssm.state_size": 128})
    assert "recurrent" in (estimate_model(layout).problem or "")


def test_encoders_have_no_kv_cache() -> None:
    estimate = estimate_model(synthetic("bert", n_layer=12, n_embd=768, n_head=12,
                                        n_head_kv=12, ctx=512), {})
    assert estimate.sized and estimate.kv_cache == 0
    assert any("no KV cache" in note for note in estimate.notes)


@pytest.mark.parametrize(("flags", "problem"), [
    ({"ctk": "q3_K"}, "not a cache type"),
    ({"ctv": "q8_0", "fa": "off"}, "requires flash-attn on"),
    ({"c": "lots"}, "ctx-size must be a whole number"),
    ({"ngl": "most"}, "n-gpu-layers must be"),
    ({"np": 0}, "parallel must be"),
    ({"fa": "maybe"}, "flash-attn must be"),
    ({"ot": "nopattern"}, "PATTERN=BUFFER_TYPE"),
])
def test_flags_llama_server_would_refuse_are_problems(flags: dict[str, FlagValue],
                                                      problem: str) -> None:
    estimate = estimate_model(synthetic(), flags)
    assert problem in (estimate.problem or ""), estimate.problem


def test_quantized_k_needs_a_head_size_that_divides_its_block() -> None:
    layout = synthetic("llama", n_embd=2000, n_head=25, n_head_kv=5)  # head size 80
    assert "multiple of 32" in (estimate_model(layout, {"ctk": "q4_0"}).problem or "")
    assert estimate_model(layout, {"ctk": "q8_0", "ctv": "f16"}).problem is not None
    assert estimate_model(layout, {"ctk": "bf16"}).sized


def test_unset_context_uses_the_training_context_and_says_so() -> None:
    estimate = estimate_model(synthetic(ctx=131072), {"ngl": "all"})
    assert estimate.ctx_size == 131072
    assert any("training context" in note for note in estimate.notes)
    assert not any("n-gpu-layers" in note for note in estimate.notes)
    per_slot = estimate_model(synthetic(), {"kv-unified-per-slot": 8192, "np": 2, "kvu": True})
    assert per_slot.ctx_size == 16384


def test_a_profile_is_estimated_from_its_model_and_flags(shapes_dir: Path) -> None:
    model = model_file(shapes_dir, SHAPES["A"])
    config = parse_config(f"""
profiles:
  tiny:
    model: {model}
    flags: {{n_ctx: 4096, --cache-type-k: q8_0, ngl: 99}}
""")
    estimate = estimate_profile(config.profiles["tiny"])
    assert (estimate.name, estimate.model, estimate.ctx_size) == ("tiny", model, 4096)
    assert estimate.cache_type_k == "q8_0" and estimate.cache_type_v == "f16"
    assert estimate.as_dict()["total"] == estimate.total > 0
    cache = LayoutCache()
    assert estimate_profile(config.profiles["tiny"], cache=cache) == estimate
    assert cache.get(model) is cache.get(model)


def test_layout_cache_rereads_a_changed_file(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", n_layers=2)
    cache = LayoutCache(max_entries=1)
    first = cache.get(path)
    assert cache.get(path) is first
    write_tiny_llama(tmp_path / "m.gguf", n_layers=3)
    assert cache.get(path).metadata["llama.block_count"] == 3
    path.unlink()
    with pytest.raises(ModelLayoutError, match="cannot read"):
        cache.get(path)


# --- fixes and the report ---------------------------------------------------------------


def test_suggest_fix_prefers_a_quantized_cache_then_a_smaller_context() -> None:
    layout = synthetic()  # ~4.6 GiB of Q4_K weights
    estimate = estimate_model(layout, {"c": 131072, "ngl": 99}, name="llama")
    assert estimate.total > 16 * GiB > estimate.weights + 2 * GiB
    fix = suggest_fix(estimate, 16 * GiB)
    assert fix is not None
    for changes, candidate in fix.options:
        assert candidate.total <= 16 * GiB, changes
    first_changes = fix.options[0][0]
    assert first_changes["cache-type-k"] == "q8_0"
    smaller = next(c for c, _ in fix.options if "ctx-size" in c)
    assert smaller.keys() == {"ctx-size"}
    ctx = smaller["ctx-size"]
    assert isinstance(ctx, int) and ctx % 1024 == 0
    too_big = estimate_model(layout, {"c": ctx + 1024, "ngl": 99})
    assert too_big.total > 16 * GiB  # the largest that fits
    assert fix.text.startswith("cache-type-k: q8_0, cache-type-v: q8_0 -> ")
    assert suggest_fix(estimate, 64 * GiB) is None


def test_suggest_fix_turns_flash_attention_on_for_a_quantized_v_cache() -> None:
    estimate = estimate_model(synthetic(), {"c": 131072, "fa": "off"})
    fix = suggest_fix(estimate, 16 * GiB)
    assert fix is not None
    changes, candidate = fix.options[0]
    assert changes["flash-attn"] == "on" and candidate.sized and candidate.flash_attn
    assert "fa" not in candidate.flags


def test_suggest_fix_only_shrinks_cache_types() -> None:
    estimate = estimate_model(synthetic(), {"c": 131072, "ctk": "q8_0"})  # V stays f16
    fix = suggest_fix(estimate, 14 * GiB)
    assert fix is not None
    changes = fix.options[0][0]
    assert changes == {"cache-type-v": "q8_0"}  # K is already q8_0: left alone


def test_suggest_fix_offloads_fewer_layers_when_the_weights_do_not_fit() -> None:
    estimate = estimate_model(synthetic(), {"c": 8192}, name="llama")
    fix = suggest_fix(estimate, 4 * GiB)
    assert fix is not None and len(fix.options) == 1
    changes, candidate = fix.options[0]
    layers = changes["n-gpu-layers"]
    assert isinstance(layers, int) and 0 < layers < 33
    assert candidate.total <= 4 * GiB
    assert estimate_model(synthetic(), {"c": 8192, "ngl": layers + 1}).total > 4 * GiB
    assert "run on the CPU" in fix.text
    hopeless = suggest_fix(estimate, 256 * MiB)
    assert hopeless is not None and not hopeless.options
    assert str(hopeless).startswith("nothing swapd tries fits in 256.0 MiB")


def test_report_adds_up_and_says_by_how_much() -> None:
    fits = estimate_model(synthetic(), {"c": 8192, "ngl": 99}, name="small")
    too_big = estimate_model(synthetic(), {"c": 131072, "ngl": 99}, name="big")
    text, all_fit = format_report([fits, too_big], 16 * GiB)
    assert not all_fit
    lines = text.splitlines()
    assert lines[0] == "small: 32/32 layers on GPU, ctx 8192 (f16/f16 cache)"
    assert lines[1] == (
        f"  weights {format_bytes(fits.weights)} + KV 1.00 GiB + compute "
        f"{format_bytes(fits.compute)} + runtime 512.0 MiB = {format_bytes(fits.total)}")
    assert f"  fits in 16.00 GiB, {format_bytes(16 * GiB - fits.total)} to spare" in lines
    assert f"  does NOT fit in 16.00 GiB: {format_bytes(too_big.total - 16 * GiB)} over" \
        in lines
    assert any(line.startswith("  fix: cache-type-k: q8_0") for line in lines)
    assert format_report([fits, too_big])[1]  # no budget: nothing to fail
    assert "fits in" not in format_report([fits])[0]


@pytest.mark.parametrize(("text", "size"), [
    ("24GiB", 24 * GiB), ("24G", 24 * GiB), ("24", 24 * GiB), (" 80 GiB ", 80 * GiB),
    ("24000MiB", 24000 * MiB), ("24000M", 24000 * MiB), ("24GB", 24 * 10**9),
    ("1.5TiB", 3 * (1 << 39)), ("8589934592B", 8 * GiB), ("0.5gib", GiB // 2),
])
def test_parse_gpu_memory(text: str, size: int) -> None:
    assert parse_gpu_memory(text) == size


@pytest.mark.parametrize("text", ["", "lots", "24 GiB GiB", "0", "-1GiB", "24XB"])
def test_parse_gpu_memory_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="GPU memory size"):
        parse_gpu_memory(text)


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path) -> Path:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"""#!{sys.executable}
import sys
assert sys.argv[1:] == ["--query-gpu=index,uuid,memory.total",
                        "--format=csv,noheader,nounits"], sys.argv
print("0, GPU-aaaa, 24576")
print("1, GPU-bbbb, 81559")
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_detect_gpu_memory_sums_the_visible_gpus(fake_nvidia_smi: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    smi = str(fake_nvidia_smi)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_gpu_memory(nvidia_smi=smi) == (24576 + 81559) * MiB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert detect_gpu_memory(nvidia_smi=smi) == 81559 * MiB
    assert detect_gpu_memory(nvidia_smi=smi, visible_devices="1") == 81559 * MiB
    assert detect_gpu_memory(nvidia_smi=smi, visible_devices="GPU-aaaa") == 24576 * MiB
    assert detect_gpu_memory(nvidia_smi=smi, visible_devices="0,1") == (24576 + 81559) * MiB
    assert detect_gpu_memory(nvidia_smi=smi, visible_devices="") is None
    assert detect_gpu_memory(nvidia_smi="/nonexistent/nvidia-smi") is None


# --- the accuracy table -----------------------------------------------------------------


def print_table() -> None:
    """The accuracy table of docs/memory.md, measured on this machine's llama-server."""
    import tempfile

    binary = llama_build.ensure_llama_server()
    with tempfile.TemporaryDirectory() as tmp:
        print("| model | llama-server args | weights est / meas (MiB) | KV est / meas (MiB) "
              "| compute est / meas (MiB) | error W / KV / compute |")
        print("|---|---|---|---|---|---|")
        for row in accuracy_rows(binary, Path(tmp)):
            e, m = row.estimate, row.measured

            def pair(est: int, meas: float) -> str:
                return f"{est / MiB:.2f} / {meas / MiB:.2f}"

            def error(est: int, meas: float) -> str:
                return f"{(est - meas) / meas * 100:+.1f} %"

            args = " ".join(row.args) or "(none)"
            print(f"| {row.shape.label}: {row.shape.describe()} | `{args}` "
                  f"| {pair(e.host_weights, m.weights)} | {pair(e.host_kv, m.kv)} "
                  f"| {pair(e.compute, m.compute)} | {error(e.host_weights, m.weights)} / "
                  f"{error(e.host_kv, m.kv)} / {error(e.compute, m.compute)} |")


if __name__ == "__main__":
    print_table()


# --- the context one request gets ---------------------------------------------------------

# What the real llama-server (the build the tests use) put in /props
# ``default_generation_settings.n_ctx`` and every /slots ``n_ctx``, for a model trained
# on 16384 (or 5000) tokens; docs/memory.md has the commands.
SLOT_CONTEXTS: list[tuple[dict[str, FlagValue], int, int, int, bool]] = [
    # flags, n_ctx_train, per request, slots, unified
    ({"ctx-size": 4096, "parallel": 2}, 16384, 2048, 2, False),
    ({"ctx-size": 4096, "parallel": 2, "kv-unified": True}, 16384, 4096, 2, True),
    ({"c": 4096, "np": 2, "kvu": True}, 16384, 4096, 2, True),
    ({"ctx-size": 4096, "parallel": 2, "no-kv-unified": True}, 16384, 2048, 2, False),
    ({"ctx-size": 4096}, 16384, 4096, 4, True),  # parallel auto: 4 slots, unified
    ({"ctx-size": 4096, "no-kv-unified": True}, 16384, 4096, 4, True),  # ignored
    ({"parallel": -1, "no-kv-unified": True}, 16384, 16384, 4, True),
    ({}, 16384, 16384, 4, True),
    ({"parallel": 2}, 16384, 16384, 2, False),  # no ctx-size: each slot the training one
    ({"ctx-size": 0, "parallel": 2}, 16384, 16384, 2, False),
    ({"parallel": 2, "kv-unified": True}, 16384, 16384, 2, True),
    ({"ctx-size": 4096, "parallel": 1}, 16384, 4096, 1, False),
    ({"ctx-size": 5000, "parallel": 3}, 16384, 1792, 3, False),  # pad(pad(5000) / 3)
    ({"ctx-size": 5000, "parallel": 3, "kv-unified": True}, 16384, 5120, 3, True),
    ({"ctx-size": 5000, "parallel": 1}, 16384, 5120, 1, False),  # padded to 256
    ({"ctx-size": 32768, "parallel": 1}, 16384, 16384, 1, False),  # capped at training
    ({"ctx-size": 32768, "parallel": 2}, 16384, 16384, 2, False),
    ({"ctx-size": 32768, "parallel": 2, "kv-unified": True}, 16384, 16384, 2, True),
    ({"ctx-size": 32768}, 16384, 16384, 4, True),
    ({"parallel": 2, "kv-unified-per-slot": 1000}, 16384, 1000, 2, False),
    ({"ctx-size": 4096, "parallel": 2, "kv-unified-per-slot": 1000}, 16384, 1000, 2, False),
    ({"ctx-size": 1024, "parallel": 2, "kv-unified-per-slot": 1000}, 16384, 512, 2, False),
    ({"parallel": 2, "kv-unified": True, "kv-unified-per-slot": 1000}, 16384, 1000, 2, True),
    ({"kv-unified-per-slot": 1000}, 16384, 1000, 4, True),
    ({"parallel": 2, "kv-unified-per-slot": 20000}, 16384, 16384, 2, False),
    ({"ctx-size": 0, "parallel": 2, "kv-unified-per-slot": 1000}, 16384, 1000, 2, False),
    ({}, 5000, 5000, 4, True),
    ({"parallel": 2}, 5000, 5000, 2, False),
    ({"ctx-size": 8192, "parallel": 1}, 5000, 5000, 1, False),
    ({"ctx-size": 8192, "parallel": 2}, 5000, 4096, 2, False),
    ({"ctx-size": 4000, "parallel": 1}, 16384, 4096, 1, False),
]


@pytest.mark.parametrize(("flags", "train", "per_request", "slots", "unified"),
                         SLOT_CONTEXTS)
def test_slot_context_is_what_llama_server_gives_a_slot(
        flags: dict[str, FlagValue], train: int, per_request: int, slots: int,
        unified: bool) -> None:
    got = slot_context(flags, train)
    assert (got.per_request, got.slots, got.unified) == (per_request, slots, unified)


def test_slot_context_without_a_training_context() -> None:
    """No readable header: a set ctx-size is still known, an unset one is not."""
    assert slot_context({"ctx-size": 65536, "parallel": 2}, None).per_request == 32768
    assert slot_context({"parallel": 2}, None).per_request is None
