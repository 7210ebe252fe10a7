"""Tiny, real llama-architecture GGUF models for the integration tests.

The weights are random, so the answers are gibberish, but the real ``llama-server`` loads
these files in tens of milliseconds and serves every endpoint the tests need: chat
completions (through the ChatML template written here), ``/props``, ``/v1/models``.
A model is about half a megabyte and is fully determined by its arguments, ``seed``
included, so two calls with the same arguments write byte-identical files.

``llama-server --ctx-size`` is capped at the model's training context, so the context a
test needs must be written into the model (``context_length``).

Run as a script to write one::

    python tests/support/tiny_gguf.py /tmp/tiny.gguf
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, the template llama-server's Jinja engine and its built-in detection both know."""

_TEXT = (
    "the of and to in is it you that was for on are with as be at this have from or one "
    "had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part "
    "model swap fake tiny token hello world"
)
_WORDS = _TEXT.split()


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: specials, 256 byte fallbacks, printable pieces."""
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [gguf.TokenType.CONTROL] * 2
    pieces: list[str] = ["▁"]
    pieces += [c for c in string.printable[:94]]  # digits, letters, punctuation
    pieces += ["▁" + c for c in string.ascii_letters]
    pieces += ["▁" + w for w in _WORDS] + list(_WORDS)
    seen = set(tokens)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(gguf.TokenType.NORMAL)
    # SentencePiece merges prefer higher scores: longer pieces win over their parts.
    scores = [0.0] * len(tokens)
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == gguf.TokenType.NORMAL:
            scores[i] = float(len(tok)) - i * 1e-4
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(
    path: str | Path,
    *,
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 4,
    context_length: int = 2048,
    seed: int = 0,
    name: str = "tiny",
) -> Path:
    """Write a random-weight llama model with a ChatML template to ``path`` and return it."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError(
            f"n_embd={n_embd} must divide by n_head={n_head}, "
            f"and n_head by n_head_kv={n_head_kv}"
        )
    path = Path(path)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    n_ff = 2 * n_embd
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        # numpy shape is (rows, cols) = ggml (ne1, ne0): out x in for a matmul weight.
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    writer.add_tensor("token_embd.weight", weights(n_vocab, n_embd))
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weights(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weights(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weights(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", weights(n_vocab, n_embd))

    partial = path.with_name(path.name + ".partial")
    writer.path = partial
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)  # atomic: a half-written model is never loaded
    return path


HEADER_ONLY = b"GGUF" + (3).to_bytes(4, "little") + bytes(16)
"""A GGUF v3 with no tensors and no metadata: 24 bytes, no model to run."""


def write_header_only(*paths: Path) -> None:
    """Stand-in model files for children that never open them (the fake llama-server):
    enough for swapd's check that a profile's model file is a readable GGUF."""
    for path in paths:
        if not path.exists():
            path.write_bytes(HEADER_ONLY)


if __name__ == "__main__":
    print(write_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf"))
