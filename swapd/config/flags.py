"""Turn a profile's ``flags`` mapping into llama-server's argv (SPEC §2).

The whole translation is :func:`flag_argv`; :func:`swapd.config.argv.build_argv` puts
swapd's own flags in front. Every rule is small and table-tested:

* **Names.** Leading dashes are optional and ``_`` becomes ``-`` (``--ctx_size`` ->
  ``ctx-size``). Names from older llama.cpp servers, llama-cpp-python and Ollama are mapped
  to today's flags (``n_ctx`` -> ``ctx-size``, ``num_gpu`` -> ``n-gpu-layers``), see
  :data:`LEGACY_NAMES`. Case is kept: ``-C`` (cpu mask) is not ``-c`` (context size).
* **Dashes.** A one-letter name gets one dash (``c`` -> ``-c``). So do llama-server's
  multi-letter short forms in :data:`SHORT_FORMS` (``ngl`` -> ``-ngl``, ``fa`` -> ``-fa``),
  because llama-server spells them with one dash and rejects ``--ngl``. Every other name
  gets two dashes. A short form is passed as written, not expanded, so the argv shows
  what the user wrote; :func:`canonical_flag` expands it where two spellings of one flag
  must be recognised as the same flag (``c`` and ``ctx-size``).
* **Values.** ``true`` -> the bare flag; ``false`` or ``null`` -> nothing; a list -> the
  flag once per item; anything else -> the flag then its value as text (``0.7`` ->
  ``"0.7"``, ``65536`` -> ``"65536"``, ``"on"`` -> ``"on"``).

The result is a list for ``exec``; nothing here ever goes through a shell.

``swapd check`` validates names against the real ``llama-server --help``:
:func:`parse_help_flags` reads its option table and :func:`unknown_flags` compares.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import TypeAlias

FlagScalar: TypeAlias = str | int | float
FlagValue: TypeAlias = (
    str | int | float | bool | list[FlagScalar] | tuple[FlagScalar, ...] | None
)
"""A flag's value as YAML gives it. Loaded configs hold lists as tuples (immutable)."""

SWAPD_OWNED = frozenset({"model", "host", "port"})
"""Flags swapd always passes itself (canonical names); setting them in ``flags`` is a
config error. Their short forms (``m``) are caught through :func:`canonical_flag`."""

SHORT_FORMS: Mapping[str, str] = MappingProxyType({
    # one letter
    "a": "alias", "b": "batch-size", "c": "ctx-size", "e": "escape", "h": "help",
    "j": "json-schema", "l": "logit-bias", "m": "model", "n": "n-predict",
    "r": "reverse-prompt", "s": "seed", "t": "threads", "v": "verbose", "C": "cpu-mask",
    # llama-server's multi-letter short forms (one dash each), as its --help lists them
    "ag": "agent", "bs": "backend-sampling", "cb": "cont-batching", "cl": "cache-list",
    "cmoe": "cpu-moe", "cms": "checkpoint-min-step", "cram": "cache-ram",
    "ctk": "cache-type-k", "ctv": "cache-type-v", "ctxcp": "ctx-checkpoints",
    "dev": "device", "dr": "docker-repo", "dt": "defrag-thold", "fa": "flash-attn",
    "fit": "fit", "fitc": "fit-ctx", "fitt": "fit-target", "hf": "hf-repo",
    "hfr": "hf-repo", "hff": "hf-file", "hft": "hf-token", "jf": "json-schema-file",
    "kvo": "kv-offload", "kvu": "kv-unified", "lcd": "lookup-cache-dynamic",
    "lcs": "lookup-cache-static", "lm": "load-mode", "lv": "verbosity", "lzm": "lazy-mode",
    "mg": "main-gpu", "mm": "mmproj", "mmdev": "mmproj-device", "mmu": "mmproj-url",
    "mu": "model-url", "ncffn": "n-cpu-ffn", "ncmoe": "n-cpu-moe", "ngl": "n-gpu-layers",
    "nkvo": "no-kv-offload", "no-ag": "no-agent", "no-kvu": "no-kv-unified",
    "nocb": "no-cont-batching", "np": "parallel", "nr": "no-repack",
    "ot": "override-tensor", "rea": "reasoning", "sm": "split-mode", "sp": "special",
    "sps": "slot-prompt-similarity", "tb": "threads-batch", "to": "timeout",
    "ts": "tensor-split", "ub": "ubatch-size",
    "Cb": "cpu-mask-batch", "Cr": "cpu-range", "Crb": "cpu-range-batch",
    # the same for the draft model of speculative decoding
    "md": "model-draft", "ngld": "n-gpu-layers-draft", "devd": "device-draft",
    "ctkd": "cache-type-k-draft", "ctvd": "cache-type-v-draft", "td": "threads-draft",
    "tbd": "threads-batch-draft", "otd": "override-tensor-draft", "cmoed": "cpu-moe-draft",
    "ncmoed": "n-cpu-moe-draft", "hfd": "hf-repo-draft", "hfrd": "hf-repo-draft",
    "Cd": "cpu-mask-draft", "Cbd": "cpu-mask-batch-draft", "Crd": "cpu-range-draft",
})
"""Short flag -> its long name, for the short forms llama-server spells with one dash."""

LEGACY_NAMES: Mapping[str, str] = MappingProxyType({
    # older llama.cpp / llama-cpp-python settings names
    "n-ctx": "ctx-size",
    "n-batch": "batch-size",
    "n-ubatch": "ubatch-size",
    "n-threads": "threads",
    "n-threads-batch": "threads-batch",
    "n-parallel": "parallel",
    "n-keep": "keep",
    "model-alias": "alias",
    "type-k": "cache-type-k",
    "type-v": "cache-type-v",
    "flash-attention": "flash-attn",
    "use-mlock": "mlock",
    # Ollama's option names, for people migrating Modelfile parameters
    "num-ctx": "ctx-size",
    "num-gpu": "n-gpu-layers",
    "num-batch": "batch-size",
    "num-thread": "threads",
    "num-predict": "n-predict",
    "num-keep": "keep",
})
"""Old names (after ``_`` -> ``-``) mapped to llama-server's current long flag."""

_FLAG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def normalize_flag(key: str) -> str:
    """The flag name swapd passes for a ``flags`` key, without dashes.

    ``--ctx_size`` -> ``ctx-size``, ``n_ctx`` -> ``ctx-size``, ``c`` -> ``c``. Raises
    ``ValueError`` for a key that cannot be a flag name (empty, spaces, ``=``), since the
    value belongs in the mapping's value, not in the key.
    """
    name = key.strip().lstrip("-").replace("_", "-")
    if not _FLAG_NAME.fullmatch(name):
        raise ValueError(
            f"{key!r} is not a flag name; write the name alone "
            "(letters, digits, '-', '_', '.') and put the value after the colon")
    return LEGACY_NAMES.get(name, name)


def canonical_flag(key: str) -> str:
    """The long name of the flag a key sets: like :func:`normalize_flag`, then short forms
    expanded (``c`` -> ``ctx-size``, ``m`` -> ``model``). Used to find two spellings of one
    flag and flags that swapd owns."""
    name = normalize_flag(key)
    return SHORT_FORMS.get(name, name)


def flag_token(name: str) -> str:
    """``c`` -> ``-c``, ``ngl`` -> ``-ngl``, ``ctx-size`` -> ``--ctx-size`` (see module doc)."""
    return f"-{name}" if len(name) == 1 or name in SHORT_FORMS else f"--{name}"


def format_value(value: FlagScalar) -> str:
    """A flag value as argv text: ints as ints, floats without noise (``0.7`` -> ``"0.7"``,
    ``2.0`` -> ``"2"``, since llama-server parses integer flags with ``stoi``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"a flag value must be text or a number, got {value!r}")
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def flag_argv(flags: Mapping[str, FlagValue]) -> list[str]:
    """The argv part for ``flags``, in the mapping's order (see module doc for the rules)."""
    argv: list[str] = []
    for key, value in flags.items():
        token = flag_token(normalize_flag(key))
        if value is True:
            argv.append(token)
        elif value is False or value is None:
            continue
        elif isinstance(value, list | tuple):
            for item in value:
                argv += [token, format_value(item)]
        else:
            argv += [token, format_value(value)]
    return argv


def sets_flag(flags: Mapping[str, FlagValue], canonical: str) -> bool:
    """Whether ``flags`` passes the flag ``canonical`` (a long name) at all."""
    return any(
        canonical_flag(key) == canonical and value is not None and value is not False
        for key, value in flags.items()
    )


# --- llama-server --help -------------------------------------------------------------

_OPTION_COLUMN_END = re.compile(r"(?<![,\s])\s{2,}")
_HELP_TOKEN = re.compile(r"(?:^|(?<=[\s,]))(-{1,2}[A-Za-z0-9][A-Za-z0-9._-]*)")
_MAX_OPTION_INDENT = 4


def parse_help_flags(text: str) -> frozenset[str]:
    """Every flag spelling (``-c``, ``--ctx-size``, ``--no-jinja``) in ``llama-server --help``.

    Option lines start at the left margin (current builds) or with a small indent (older
    ones); help text and ``(env: ...)`` lines are indented far more. An option line lists
    its spellings separated by commas, then an optional value hint, then two or more
    spaces before the description::

        -c,    --ctx-size N                     size of the prompt context ...
        -fa,   --flash-attn [on|off|auto]       set Flash Attention use ...
        --jinja, --no-jinja                     whether to use jinja template engine ...
    """
    accepted: set[str] = set()
    for line in text.splitlines():
        stripped = line.lstrip()
        if not stripped.startswith("-") or len(line) - len(stripped) > _MAX_OPTION_INDENT:
            continue
        option_column = _OPTION_COLUMN_END.split(stripped, maxsplit=1)[0]
        accepted.update(_HELP_TOKEN.findall(option_column))
    return frozenset(accepted)


def unknown_flags(flags: Mapping[str, FlagValue], accepted: Collection[str]) -> list[str]:
    """Messages for each flag in ``flags`` whose spelling ``accepted`` lacks.

    Flags that are ``false``/``null`` are skipped: they never reach the argv.
    """
    problems: list[str] = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        name = normalize_flag(key)
        token = flag_token(name)
        if token in accepted:
            continue
        written = "" if key.strip().lstrip("-") == name else f" (written {key!r})"
        close = difflib.get_close_matches(token, list(accepted), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"llama-server does not accept {token}{written}{hint}")
    return problems
