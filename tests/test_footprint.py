"""Measured footprints: llama-server's buffer lines, per device, remembered per profile."""

from __future__ import annotations

from pathlib import Path

from swapd.core.footprint import Footprint, FootprintStore, definition_key

MiB = 2**20

# Lines as a CUDA build prints them (two GPUs, a split model), host buffers among them.
CUDA_LOG = """\
load_tensors: offloaded 65/65 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   417.66 MiB
load_tensors:        CUDA0 model buffer size =  8120.25 MiB
load_tensors:        CUDA1 model buffer size =  8120.25 MiB
llama_context:  CUDA_Host  output buffer size =     0.58 MiB
llama_kv_cache:      CUDA0 KV buffer size =  4096.00 MiB
llama_kv_cache:      CUDA1 KV buffer size =  4096.00 MiB
sched_reserve:      CUDA0 compute buffer size =   247.31 MiB
sched_reserve:      CUDA1 compute buffer size =   120.00 MiB
sched_reserve:  CUDA_Host compute buffer size =    72.02 MiB
""".splitlines()


def test_buffers_add_up_per_gpu_and_host_buffers_do_not_count() -> None:
    footprint = Footprint.parse(CUDA_LOG)
    assert footprint is not None
    assert footprint.on_gpus() == {
        "CUDA0": round((8120.25 + 4096 + 247.31) * MiB),
        "CUDA1": round((8120.25 + 4096 + 120) * MiB)}
    assert footprint.buffers["CUDA0"]["KV"] == 4096 * MiB
    assert "CPU_Mapped" in footprint.buffers and "CPU_Mapped" not in footprint.on_gpus()


def test_a_quiet_log_measures_nothing() -> None:
    assert Footprint.parse(["main: server is listening on http://127.0.0.1:8080"]) is None


def test_the_store_remembers_per_definition_and_survives_a_restart(tmp_path: Path) -> None:
    footprint = Footprint.parse(CUDA_LOG)
    assert footprint is not None
    key = definition_key(Path("/m/q.gguf"), {"ctx-size": 8192}, 1.0)
    store = FootprintStore(tmp_path / "footprints.json")
    store.put("qwen", key, footprint)
    again = FootprintStore(tmp_path / "footprints.json")
    assert again.get("qwen", key) == footprint
    changed = definition_key(Path("/m/q.gguf"), {"ctx-size": 16384}, 1.0)
    assert again.get("qwen", changed) is None  # measured under other flags: not reused
    assert again.get("other", key) is None


def test_a_store_that_cannot_write_keeps_the_measurement_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = FootprintStore(blocker / "footprints.json")  # parent is a file: writes fail
    footprint = Footprint.parse(CUDA_LOG)
    assert footprint is not None
    store.put("qwen", "k", footprint)
    assert store.get("qwen", "k") == footprint
