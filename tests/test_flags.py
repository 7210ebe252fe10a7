"""Flag translation (SPEC §2): every rule as a table, plus the ``--help`` parser."""

from __future__ import annotations

import subprocess

import pytest

from swapd.config import parse_config
from swapd.config.argv import build_argv
from swapd.config.flags import (
    SHORT_FORMS,
    SWAPD_OWNED,
    FlagValue,
    canonical_flag,
    flag_argv,
    flag_token,
    format_value,
    normalize_flag,
    parse_help_flags,
    unknown_flags,
)
from tests.support.llama_build import find_llama_server


@pytest.mark.parametrize(("key", "expected"), [
    ("ctx-size", "ctx-size"),
    ("--ctx-size", "ctx-size"),
    ("--ctx_size", "ctx-size"),
    ("ctx_size", "ctx-size"),
    ("-c", "c"),
    ("c", "c"),
    ("C", "C"),                      # case is kept: -C is the cpu mask, not -c
    ("ngl", "ngl"),
    ("n_ctx", "ctx-size"),
    ("n-ctx", "ctx-size"),
    ("--n_ctx", "ctx-size"),
    ("n_gpu_layers", "n-gpu-layers"),
    ("n_batch", "batch-size"),
    ("n_ubatch", "ubatch-size"),
    ("n_threads", "threads"),
    ("n_threads_batch", "threads-batch"),
    ("n_parallel", "parallel"),
    ("model_alias", "alias"),
    ("type_k", "cache-type-k"),
    ("num_ctx", "ctx-size"),
    ("num_gpu", "n-gpu-layers"),
    ("flash_attn", "flash-attn"),
    ("fim-qwen-1.5b-default", "fim-qwen-1.5b-default"),
])
def test_normalize_flag(key: str, expected: str) -> None:
    assert normalize_flag(key) == expected


@pytest.mark.parametrize("key", ["", "--", "ctx size", "ctx-size=4096", "-", "é"])
def test_normalize_flag_rejects_non_names(key: str) -> None:
    with pytest.raises(ValueError, match="not a flag name"):
        normalize_flag(key)


@pytest.mark.parametrize(("key", "expected"), [
    ("c", "ctx-size"), ("-c", "ctx-size"), ("n_ctx", "ctx-size"), ("ctx-size", "ctx-size"),
    ("m", "model"), ("--model", "model"), ("ngl", "n-gpu-layers"), ("fa", "flash-attn"),
    ("np", "parallel"), ("a", "alias"), ("C", "cpu-mask"), ("jinja", "jinja"),
])
def test_canonical_flag_expands_short_forms(key: str, expected: str) -> None:
    assert canonical_flag(key) == expected


@pytest.mark.parametrize(("name", "token"), [
    ("c", "-c"), ("C", "-C"), ("ngl", "-ngl"), ("fa", "-fa"), ("np", "-np"),
    ("ctk", "-ctk"), ("no-kvu", "-no-kvu"), ("ctx-size", "--ctx-size"), ("jinja", "--jinja"),
    ("xy", "--xy"),                  # unknown two-letter names are long flags
])
def test_flag_token(name: str, token: str) -> None:
    assert flag_token(name) == token


@pytest.mark.parametrize(("flags", "argv"), [
    ({"jinja": True}, ["--jinja"]),
    ({"jinja": False}, []),
    ({"jinja": None}, []),
    ({"flash-attn": "on"}, ["--flash-attn", "on"]),
    ({"flash-attn": "off"}, ["--flash-attn", "off"]),
    ({"ctx-size": 65536}, ["--ctx-size", "65536"]),
    ({"temp": 0.7}, ["--temp", "0.7"]),
    ({"min-p": 0.05}, ["--min-p", "0.05"]),
    ({"rope-freq-scale": 1e-05}, ["--rope-freq-scale", "1e-05"]),
    ({"temp": 2.0}, ["--temp", "2"]),
    ({"seed": -1}, ["--seed", "-1"]),
    ({"lora": ["a.gguf", "b.gguf"]}, ["--lora", "a.gguf", "--lora", "b.gguf"]),
    ({"lora": ("a.gguf",)}, ["--lora", "a.gguf"]),
    ({"lora": []}, []),
    ({"override-kv": ["a=int:1", 2]}, ["--override-kv", "a=int:1", "--override-kv", "2"]),
    ({"c": 4096}, ["-c", "4096"]),
    ({"ngl": 99}, ["-ngl", "99"]),
    ({"--ctx_size": 8192}, ["--ctx-size", "8192"]),
    ({"n_ctx": 8192}, ["--ctx-size", "8192"]),
    ({"chat-template": "a b; rm -rf /"}, ["--chat-template", "a b; rm -rf /"]),  # no shell
    ({"alias": ""}, ["--alias", ""]),
    ({"a": 1, "b": True, "c": None, "d": "x"}, ["-a", "1", "-b", "-d", "x"]),  # order kept
])
def test_flag_argv(flags: dict[str, FlagValue], argv: list[str]) -> None:
    assert flag_argv(flags) == argv


@pytest.mark.parametrize(("value", "text"), [
    (0.7, "0.7"), (65536, "65536"), (1.0, "1"), (-0.5, "-0.5"), (1e20, "1e+20"), ("x", "x"),
])
def test_format_value(value: str | int | float, text: str) -> None:
    assert format_value(value) == text


def test_format_value_refuses_booleans() -> None:
    with pytest.raises(TypeError):
        format_value(True)


def test_swapd_owns_model_host_port() -> None:
    assert {"model", "host", "port"} == SWAPD_OWNED


CONFIG = """
llama_server:
  command: [/opt/llama/llama-server, --log-disable]
profiles:
  qwen:
    model: /models/q.gguf
    flags: {ctx-size: 8192, flash-attn: on, jinja: true, no-webui: false}
  named:
    model: /models/q.gguf
    flags: {alias: my-name, c: 4096}
  unset-alias:
    model: /models/q.gguf
    flags: {alias: null}
"""


def test_build_argv() -> None:
    config = parse_config(CONFIG)
    assert build_argv(config, config.profiles["qwen"], 8123) == [
        "/opt/llama/llama-server", "--log-disable",
        "--model", "/models/q.gguf", "--host", "127.0.0.1", "--port", "8123",
        "--alias", "qwen",
        "--ctx-size", "8192", "--flash-attn", "on", "--jinja",
    ]


def test_build_argv_keeps_an_alias_set_in_flags() -> None:
    config = parse_config(CONFIG)
    argv = build_argv(config, config.profiles["named"], 1)
    assert argv.count("--alias") == 1
    assert argv[-4:] == ["--alias", "my-name", "-c", "4096"]
    # a null alias sets nothing, so swapd still passes the profile name
    argv = build_argv(config, config.profiles["unset-alias"], 1)
    assert argv[-2:] == ["--alias", "unset-alias"]


# A captured excerpt of `llama-server --help` (llama.cpp, ggml 0.26 era): option lines at
# the left margin, hints after the names, descriptions from column 40, long option lists
# wrapped onto their own line, help bullets and (env: ...) lines indented.
HELP = """\
----- common params -----

-h,    --help, --usage                  print usage and exit
--version                               show version and build info
-t,    --threads N                      number of CPU threads to use during generation
                                        (default: -1)
                                        (env: LLAMA_ARG_THREADS)
-c,    --ctx-size N                     size of the prompt context (default: 4096, 0 = loaded
                                        from model)
                                        (env: LLAMA_ARG_CTX_SIZE)
-kvu,  --kv-unified, -no-kvu, --no-kv-unified
                                        use single unified KV buffer shared across all
                                        sequences (default: enabled if number of slots is auto)
-cnv,  --conversation, -no-cnv, --no-conversation
                                        whether to run in conversation mode:
                                        - does not print special tokens and suffix/prefix
                                        - interactive mode is also enabled
-ot,   --override-tensor <tensor name pattern>=<buffer type>,...
                                        override tensor buffer type
-ngl,  --gpu-layers, --n-gpu-layers N   max. number of layers to store in VRAM, either an exact
                                        number, 'auto', or 'all' (default: auto)
                                        (env: LLAMA_ARG_N_GPU_LAYERS)
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto',
                                        default: 'auto')
                                        (env: LLAMA_ARG_FLASH_ATTN)
--spec-draft-hf, -hfd, -hfrd, --hf-repo-draft <user>/<model>[:quant]
                                        Same as --hf-repo, but for the draft model (default:
                                        unused)


----- example-specific params -----

--jinja, --no-jinja                     whether to use jinja template engine for chat (default:
                                        enabled)
                                        (env: LLAMA_ARG_JINJA)
-np,   --parallel N                     number of server slots (default: -1, -1 = auto)
--fim-qwen-1.5b-default                 use default Qwen 2.5 Coder 1.5B (note: can download
                                        weights from the internet)
"""


def test_parse_help_flags() -> None:
    assert parse_help_flags(HELP) == {
        "-h", "--help", "--usage", "--version", "-t", "--threads", "-c", "--ctx-size",
        "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified",
        "-cnv", "--conversation", "-no-cnv", "--no-conversation",
        "-ot", "--override-tensor", "-ngl", "--gpu-layers", "--n-gpu-layers",
        "-fa", "--flash-attn", "--spec-draft-hf", "-hfd", "-hfrd", "--hf-repo-draft",
        "--jinja", "--no-jinja", "-np", "--parallel", "--fim-qwen-1.5b-default",
    }


def test_parse_help_flags_reads_older_indented_layout() -> None:
    old = ("  -c N, --ctx-size N    size of the prompt context\n"
           "  --mlock               force system to keep model in RAM\n"
           "                        -x in help text is not a flag\n")
    assert parse_help_flags(old) == {"-c", "--ctx-size", "--mlock"}


@pytest.mark.parametrize(("flags", "problems"), [
    ({"ctx-size": 1, "c": 2, "ngl": 99, "fa": "on", "jinja": True, "no-jinja": True}, []),
    ({"n_ctx": 4096, "n_gpu_layers": 99, "n_parallel": 2}, []),
    ({"ctx_sz": 4096},
     ["llama-server does not accept --ctx-sz (written 'ctx_sz'); did you mean --ctx-size?"]),
    ({"--ctx-sz": 4096}, ["llama-server does not accept --ctx-sz; did you mean --ctx-size?"]),
    ({"no-mmap": True}, ["llama-server does not accept --no-mmap"]),
    ({"no-mmap": False, "mmap": None}, []),   # never passed, so never checked
])
def test_unknown_flags(flags: dict[str, FlagValue], problems: list[str]) -> None:
    assert unknown_flags(flags, parse_help_flags(HELP)) == problems


@pytest.mark.real_llama
def test_real_llama_server_help_accepts_our_flags() -> None:
    binary = find_llama_server()
    if binary is None:
        pytest.skip("no llama-server binary (set SWAPD_LLAMA_SERVER or build it with "
                    "tests/support/llama_build.py)")
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    accepted = parse_help_flags(result.stdout + result.stderr)
    for flag in ("--ctx-size", "-c", "--n-gpu-layers", "-ngl", "--flash-attn", "-fa",
                 "--jinja", "--model", "--host", "--port", "--alias"):
        assert flag in accepted, flag
    assert unknown_flags({"ctx-size": 1, "n_gpu_layers": 99, "flash-attn": "on",
                          "jinja": True}, accepted) == []
    (problem,) = unknown_flags({"ctx_sz": 1}, accepted)
    assert "does not accept --ctx-sz" in problem
    assert "did you mean --ctx-size?" in problem
    # Every one-dash multi-letter spelling must be in SHORT_FORMS, or swapd would pass it
    # with two dashes. A newer build that adds one fails here: add it to the table.
    short = {token[1:] for token in accepted
             if not token.startswith("--") and len(token) > 2}
    assert short - set(SHORT_FORMS) == set()
