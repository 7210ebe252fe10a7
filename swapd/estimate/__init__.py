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

The modules: :mod:`.gguf` (the header reader), :mod:`.memory` (the model above),
:mod:`.advice` (fixes and the report), :mod:`.gpu` (how much memory there is).

Public surface, for ``swapd check``, ``/v1/models``, ``/swapd/status`` and a swap guard:
:func:`estimate_profile` / :func:`estimate_model` -> :class:`Estimate`;
:func:`format_report`; :func:`suggest_fix`; :func:`parse_gpu_memory`;
:func:`detect_gpu_memory`; :func:`read_layout` and :class:`LayoutCache` (the header parse
of a model with a large vocabulary takes tens of milliseconds: cache it per file).
"""

from swapd.errors import ModelFileError, ModelLayoutError
from swapd.estimate.advice import Fix, format_report, suggest_fix
from swapd.estimate.gguf import (
    CACHE_TYPES,
    GGML_TYPES,
    GGMLType,
    LayoutCache,
    ModelLayout,
    TensorInfo,
    read_layout,
    tensor_nbytes,
)
from swapd.estimate.gpu import detect_gpu_memory, parse_gpu_memory
from swapd.estimate.memory import (
    RUNTIME_RESERVE,
    Estimate,
    SlotContext,
    estimate_model,
    estimate_profile,
    format_bytes,
    slot_context,
)

__all__ = [
    "CACHE_TYPES", "GGML_TYPES", "RUNTIME_RESERVE", "Estimate", "Fix", "GGMLType",
    "LayoutCache", "ModelFileError", "ModelLayout", "ModelLayoutError", "SlotContext",
    "TensorInfo", "detect_gpu_memory",
    "estimate_model", "estimate_profile", "format_bytes", "format_report",
    "parse_gpu_memory", "read_layout", "slot_context", "suggest_fix", "tensor_nbytes",
]
