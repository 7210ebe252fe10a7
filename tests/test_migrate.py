"""Importing llama-swap configs and router/sidecar manifests (``swapd.cli.migrate``).

Every imported config must load with the real loader, build each profile's argv, and
validate against the config's JSON Schema; what cannot be carried over is listed.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from swapd import config as cfg
from swapd.cli import main
from swapd.cli.migrate import import_llama_swap, import_manifest, run_import
from swapd.config import Config, parse_config
from swapd.config.argv import build_argv
from swapd.config.schema import config_schema
from swapd.errors import ConfigError
from tests.support.llama_build import find_llama_server
from tests.test_flags import HELP
from tests.test_schema import mini_problems

LLAMA_SWAP = """\
healthCheckTimeout: 300
logLevel: warn
startPort: 10001
globalTTL: 600
apiKeys: ["${env.LS_KEY}"]

macros:
  "llama": >
    /opt/llama.cpp/build/bin/llama-server
    --port ${PORT}
    --host 0.0.0.0
  "gpu": "-ngl 99 --flash-attn on"
  "ctx": 32768
  "models": "${env.MODELS_DIR}"

models:
  "qwen3-30b":
    name: "Qwen3 30B A3B"
    description: "Daily driver"
    cmd: |
      # the main model
      ${llama}
      --model ${models}/Qwen3-30B-A3B-Q4_K_M.gguf
      ${gpu}
      --ctx-size ${ctx}
      --jinja
      --temp 0.7 --top-p 1.0
      -ot "blk\\.(1[0-9])\\.ffn_.*=CPU"
      --lora ${models}/a.gguf --lora=${models}/b.gguf
    ttl: 300
    aliases: [qwen, "gpt-4o-mini"]
    env:
      - "CUDA_VISIBLE_DEVICES=0"
      - "GGML_CUDA_ENABLE_UNIFIED_MEMORY=1"
      - "HF_TOKEN=${env.HF_TOKEN}"
  "embed":
    cmd: ${llama} -m ${models}/bge-m3-Q8_0.gguf --embedding --pooling cls -c 8192 -ngl 99
    ttl: 0
    env: ["CUDA_VISIBLE_DEVICES=0"]
    unlisted: true
  "coder-32b":
    macros: {ctx: 16384}
    cmd: >
      ${llama}
      -m ${models}/Qwen2.5-Coder-32B-Q4_K_M.gguf ${gpu} -c ${ctx} --seed -1
    proxy: "http://127.0.0.1:${PORT}"
    checkEndpoint: /health
    env: ["CUDA_VISIBLE_DEVICES=0"]
    aliases:
      - {id: coder, name: Coder}
  "vllm-llama":
    cmd: vllm serve meta-llama/Llama-3.1-8B-Instruct --port ${PORT}
    proxy: "http://127.0.0.1:${PORT}"
    cmdStop: pkill -f vllm

groups:
  "main":
    swap: true
    exclusive: true
    members: ["qwen3-30b", "coder-32b"]
  "always-on":
    swap: false
    persistent: true
    members: ["embed"]

hooks:
  on_startup:
    preload: ["qwen3-30b"]
"""

ENV = {"LS_KEY": "never-copied", "MODELS_DIR": "/srv/models", "HF_TOKEN": "hf_never_copied"}


def load(text: str) -> Config:
    config = parse_config(text)
    data = yaml.load(text, Loader=cfg.StrictLoader)
    assert mini_problems(config_schema(), data) == []
    return config


def argv_of(config: Config, name: str) -> list[str]:
    return build_argv(config, config.profiles[name], 5800)


def test_a_realistic_llama_swap_config_converts() -> None:
    text, unmapped, _ = import_llama_swap(LLAMA_SWAP, environ=ENV)
    config = load(text)
    server = "/opt/llama.cpp/build/bin/llama-server"
    base = [server, "--host", "127.0.0.1", "--port", "5800"]

    def expected(name: str, model: str, *flags: str) -> list[str]:
        return [base[0], "--model", model, *base[1:], "--alias", name, *flags]

    assert list(config.profiles) == ["qwen3-30b", "embed", "coder-32b"]
    assert argv_of(config, "qwen3-30b") == expected(
        "qwen3-30b", "/srv/models/Qwen3-30B-A3B-Q4_K_M.gguf",
        "-ngl", "99", "--flash-attn", "on", "--ctx-size", "32768", "--jinja",
        "--temp", "0.7", "--top-p", "1.0", "-ot", r"blk\.(1[0-9])\.ffn_.*=CPU",
        "--lora", "/srv/models/a.gguf", "--lora", "/srv/models/b.gguf")
    assert argv_of(config, "embed") == expected(
        "embed", "/srv/models/bge-m3-Q8_0.gguf",
        "--embedding", "--pooling", "cls", "-c", "8192", "-ngl", "99")
    assert argv_of(config, "coder-32b") == expected(  # the model's own macro wins
        "coder-32b", "/srv/models/Qwen2.5-Coder-32B-Q4_K_M.gguf",
        "-ngl", "99", "--flash-attn", "on", "-c", "16384", "--seed", "-1")

    qwen = config.profiles["qwen3-30b"]
    assert qwen.aliases == ("qwen", "gpt-4o-mini")
    assert qwen.display_name == "Qwen3 30B A3B" and qwen.description == "Daily driver"
    assert qwen.ttl == 300 and config.profiles["embed"].ttl == 0
    assert config.profiles["coder-32b"].ttl is None and config.ttl == 600
    assert config.profiles["coder-32b"].aliases == ("coder",)
    # the variable every model set moved to llama_server.env; the rest stayed
    assert config.llama_server.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert qwen.env == {"GGML_CUDA_ENABLE_UNIFIED_MEMORY": "1"}
    assert config.timeouts.start == 300
    assert config.security.api_key_env == "LS_KEY"
    assert "never-copied" not in text and "hf_never_copied" not in text

    listed = "\n".join(unmapped)
    # Groups and preloads map onto residency: pinned, preload, and the budget deciding.
    assert config.residency.mode == "budget"
    assert config.profiles["embed"].pinned and not config.profiles["embed"].preload
    assert config.profiles["qwen3-30b"].preload and not config.profiles["qwen3-30b"].pinned
    assert "groups.always-on" not in listed and "hooks.on_startup.preload" not in listed
    for what in ("groups.main", "models.vllm-llama", "vLLM",
                 "models.embed.unlisted", "logLevel", "SWAPD_LOG_LEVEL=warning",
                 "models.qwen3-30b.env: HF_TOKEN came from ${env.HF_TOKEN}: not copied"):
        assert what in listed, what
    assert not any(item.startswith(("startPort", "models.coder-32b.proxy")) for item in unmapped)
    # the list is also in the file, and the vllm model is kept there as a comment
    assert all(f"#   - {item}" in text for item in unmapped)
    assert re.search(r"^  # not imported: vllm-llama .*\n  #   vllm serve ", text, re.M)


def test_env_macros_that_are_not_set_are_listed() -> None:
    text, unmapped, _ = import_llama_swap(LLAMA_SWAP, environ={})
    assert any("MODELS_DIR is not set" in item for item in unmapped)
    config = load(text)
    assert str(config.profiles["embed"].model) == "${env.MODELS_DIR}/bge-m3-Q8_0.gguf"
    assert any("relative" in item for item in unmapped)  # '${env...}/x' is no absolute path


def test_binaries_that_differ_use_the_most_common_and_say_so() -> None:
    text, unmapped, _ = import_llama_swap("""
models:
  a:
    cmd: /opt/a/llama-server --port ${PORT} -m /m/a.gguf
  b:
    cmd: /opt/b/llama-server-cuda --port ${PORT} -m /m/b.gguf
  c:
    cmd: env CUDA_VISIBLE_DEVICES=1 /opt/a/llama-server --port ${PORT} -m /m/c.gguf
""")
    config = load(text)
    assert config.llama_server.command == ("/opt/a/llama-server",)
    assert config.profiles["c"].env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert [item.split(":")[0] for item in unmapped] == ["models.b.cmd"]
    assert "/opt/b/llama-server-cuda" in unmapped[0]


def test_flag_values_keep_their_text_and_repeats_become_lists() -> None:
    text, unmapped, _ = import_llama_swap("""
models:
  m:
    cmd: >
      llama-server --port=${PORT} -m /m/x.gguf --temp 1.0 --rope-freq-base 1e6
      --override-kv a=int:1 --override-kv b=bool:false --min-p 0.05 -n -1 --no-mmap
      --chat-template-kwargs '{"enable_thinking": false}' --flash-attn=auto -v -v
""")
    assert unmapped == []
    config = load(text)
    assert argv_of(config, "m")[9:] == [
        "--temp", "1.0", "--rope-freq-base", "1e6", "--override-kv", "a=int:1",
        "--override-kv", "b=bool:false", "--min-p", "0.05", "-n", "-1", "--no-mmap",
        "--chat-template-kwargs", '{"enable_thinking": false}', "--flash-attn", "auto", "-v"]


def test_names_swapd_cannot_use_are_fixed_or_left_out() -> None:
    text, unmapped, _ = import_llama_swap("""
models:
  "My Model":
    cmd: llama-server -m /m/a.gguf
    aliases: [mine, "My Model", "a b"]
  "b":
    cmd: llama-server -m /m/b.gguf
    aliases: [mine]
""")
    config = load(text)
    assert list(config.profiles) == ["My-Model", "b"]
    assert config.profiles["My-Model"].aliases == ("mine", "a-b")
    assert config.profiles["b"].aliases == ()
    listed = "\n".join(unmapped)
    assert "clients must now ask for 'My-Model'" in listed
    assert "models.b.aliases[0]: the name 'mine' is already taken" in listed


def test_a_model_without_a_local_file_or_port_owner_is_explained() -> None:
    text, unmapped, _ = import_llama_swap("""
models:
  hf: {cmd: "llama-server --port ${PORT} -hf ggml-org/gemma-3-1b-it-GGUF"}
  docker:
    cmd: docker run --rm -p ${PORT}:8080 ghcr.io/ggml-org/llama.cpp:server -m /m/x.gguf
  remote:
    cmd: llama-server -m /m/r.gguf --port 9999
    proxy: http://10.0.0.5:9999
    checkEndpoint: none
""")
    config = load(text)
    assert list(config.profiles) == ["remote"]
    listed = "\n".join(unmapped)
    assert "models.hf: no --model in its cmd (it downloads one with --hf-repo)" in listed
    assert "models.docker: cmd uses docker run (a container)" in listed
    assert "models.remote.proxy: 'http://10.0.0.5:9999'" in listed
    assert "models.remote.checkEndpoint" in listed


def test_peers_become_commented_out_fallbacks_and_keys_are_never_copied() -> None:
    text, unmapped, _ = import_llama_swap("""
apiKeys: [sk-secret-1, sk-secret-2]
models:
  a: {cmd: llama-server -m /m/a.gguf}
peers:
  openrouter:
    proxy: https://openrouter.ai/api
    apiKey: ${env.OPENROUTER_API_KEY}
    models: [deepseek/deepseek-v3.2, z-ai/glm-4.7]
  lan:
    proxy: http://10.0.4.200:8080/
    apiKey: sk-lan-secret
    models: [small]
""", environ={"OPENROUTER_API_KEY": "sk-or-secret"})
    assert "secret" not in text
    config = load(text)
    assert config.fallbacks == () and config.security.api_key_env == "SWAPD_API_KEY"
    assert any(item.startswith("apiKeys: 2 key(s) not copied") for item in unmapped)
    assert any(item.startswith("peers.lan.apiKey: not copied: put the key in $LAN_API_KEY")
               for item in unmapped)
    # uncommented, the suggestion is a valid fallback list
    block = text[text.index("# fallbacks:"):]
    enabled = load(text[:text.index("# fallbacks:")] + re.sub(r"^# ?", "", block, flags=re.M))
    assert [(f.name, f.base_url, f.model, f.api_key_env) for f in enabled.fallbacks] == [
        ("openrouter:deepseek/deepseek-v3.2", "https://openrouter.ai/api/v1",
         "deepseek/deepseek-v3.2", "OPENROUTER_API_KEY"),
        ("openrouter:z-ai/glm-4.7", "https://openrouter.ai/api/v1", "z-ai/glm-4.7",
         "OPENROUTER_API_KEY"),
        ("lan:small", "http://10.0.4.200:8080/v1", "small", "LAN_API_KEY"),
    ]
    assert enabled.resolve("z-ai/glm-4.7") is enabled.fallbacks[1]  # asked for by model


def test_send_loading_state_maps_to_progress_reasoning() -> None:
    quiet, _, _ = import_llama_swap("sendLoadingState: false\nmodels: {a: {cmd: llama-server "
                                 "-m /m/a.gguf}}")
    assert load(quiet).progress.reasoning is False
    default, _, _ = import_llama_swap("models: {a: {cmd: llama-server -m /m/a.gguf}}")
    assert load(default).progress.reasoning is True
    assert "swapd sends them by default" in default


@pytest.mark.parametrize("text", ["", "models: []", "- a", "models: {a: [unclosed"])
def test_what_is_not_a_llama_swap_config_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        import_llama_swap(text)


# --- llama-swap's configs as they are written today ------------------------------------

# Shaped like llama-swap's own config.example.yaml: a versioned binary in a multi-line
# macro, macros in macros, ${env.X} in macros, model macros, comments (some with macros in
# them) and backslash continuations in `cmd: |` blocks, YAML anchors, and the newer keys
# swapd has nothing for.
LLAMA_SWAP_REAL = """\
healthCheckTimeout: 500
logLevel: debug
logTimeFormat: ""
logToStdout: both
metricsMaxInMemory: 1000
captureBuffer: 15
startPort: 10001
sendLoadingState: true
includeAliasesInList: false
globalTTL: 0
unloadTimeout: 20
ui:
  activity:
    session_id: ["X-Session-ID"]
performance:
  every: 15s
upstream:
  ignorePaths: ['^/ws$']

macros:
  # a build named after its commit, as llama-swap's example has it
  "latest-llama": >
    ${env.LLAMA_HOME}/build/bin/llama-server-ec9e0301
    --port ${PORT}
  "default_ctx": 4096
  "default_args": "--ctx-size ${default_ctx}"
  "models_dir": "${env.MODELS}"
  "gpu": "-ngl 99 -fa on"
  "slots": "--slot-save-path /var/cache/llama/${MODEL_ID}"

apiKeys:
  - "${env.LS_API_KEY}"

models:
  "gpt-oss-20b":
    macros:
      "default_ctx": 16384
      "temp": 0.7
    cmd: |
      # ${latest-llama} is a macro defined above
      ${latest-llama}
        # this model's default_ctx (16384) wins over the global one: don't forget
      --model ${models_dir}/gpt-oss-20b-mxfp4.gguf
      ${default_args}
      --temp ${temp} \\
        --top-p 1.0
      ${gpu}
      --jinja
    name: "gpt-oss 20B"
    description: "${MODEL_ID} with ${default_ctx} tokens"
    env:
      - "CUDA_VISIBLE_DEVICES=0"
    proxy: http://127.0.0.1:${PORT}
    checkEndpoint: /health
    aliases: [gpt-4o-mini]
    ttl: 300
    useModelName: "openai/gpt-oss-20b"
    filters:
      strip_params: "temperature, top_p"
      setParams: {top_k: 40}
    metadata:
      port: ${PORT}
      note: "${MODEL_ID} on port ${PORT}"
    concurrencyLimit: 4
    unloadTimeout: 30
    sendLoadingState: false
    capabilities: {in: [text], out: [text], tools: true}

  "qwen-coder": &coder
    macros: {ctx: 32768}
    cmd: >
      /opt/llama.cpp/build/bin/llama-server
      --port ${PORT} --host 127.0.0.1
      -m ${models_dir}/Qwen2.5-Coder-7B-Q4_K_M.gguf
      -c ${ctx} ${gpu} ${slots}
    aliases: [coder]
    ttl: -1
    unlisted: true

  "qwen-coder-long":
    <<: *coder
    macros: {ctx: 131072}
    aliases: [coder-long]

  "embed":
    cmd: |
      ${latest-llama} \\
        --model ${models_dir}/bge-m3-Q8_0.gguf \\
        # llama-swap drops this line, even between continued ones
        --embedding --pooling cls \\
        -c 8192
    ttl: 0

  "docker-llama":
    proxy: "http://127.0.0.1:${PORT}"
    cmd: |
      docker run --name ${MODEL_ID}
      --init --rm -p ${PORT}:8080 -v /mnt/nvme/models:/models
      ghcr.io/ggml-org/llama.cpp:server
      --model '/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf'
    cmdStop: docker stop ${MODEL_ID}

  "vllm-qwen":
    cmd: vllm serve Qwen/Qwen2.5-7B-Instruct --port ${PORT}
    cmdStop: pkill -f vllm

  "gemma-hf":
    cmd: ${latest-llama} -hf ggml-org/gemma-3-4b-it-GGUF

  "whisper":
    cmd: /opt/whisper.cpp/build/bin/whisper-server --port ${PORT} -m /m/ggml-base.en.bin

  "placeholder":
    name: "not set up yet"

groups:
  "group1":
    swap: true
    exclusive: true
    members: ["gpt-oss-20b", "qwen-coder"]
  "group2":
    swap: false
    exclusive: false
    members: ["docker-llama", "vllm-qwen"]
  "forever":
    persistent: true
    members: ["embed"]

hooks:
  on_startup:
    preload: ["gpt-oss-20b"]

profiles:
  "coding":
    description: "Coding-focused model routing"
    pins: {"llm-code": "qwen-coder", "image-gen": ~}

selectors:
  "coding-model":
    strategy: warm
    targets: ["qwen-coder", "gpt-oss-20b"]

routing:
  router:
    use: matrix
    settings:
      matrix:
        vars: {q: qwen-coder, g: gpt-oss-20b}
        sets: {standard: "q & g"}
  scheduler:
    use: fifo

peers:
  openrouter:
    proxy: https://openrouter.ai/api
    apiKey: ${env.OPENROUTER_API_KEY}
    models: [z-ai/glm-4.7]
"""

REAL_OUTCOMES = {
    "gpt-oss-20b": "imported",
    "qwen-coder": "imported",
    "qwen-coder-long": "imported",
    "embed": "imported",
    "docker-llama": "cmd uses docker run (a container)",
    "vllm-qwen": "not llama-server: program 'vllm' (vLLM)",
    "gemma-hf": "no --model in its cmd (it downloads one with --hf-repo)",
    "whisper": "not llama-server: program 'whisper-server' (whisper.cpp's server)",
    "placeholder": "no 'cmd'",
}

# llama-server --help lines for the flags the example uses beyond tests.test_flags.HELP.
MORE_HELP = """\
--temp N                                temperature (default: 0.8)
--top-p N                               top-p sampling (default: 0.9)
--slot-save-path PATH                   path to save slot kv cache (default: disabled)
--embedding, --embeddings               restrict to only support embedding use case
--pooling {none,mean,cls,last,rank}     pooling type for embeddings
"""


def test_llama_swaps_own_example_imports_every_llama_server_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    environ = {"LLAMA_HOME": "/opt/llama.cpp", "MODELS": str(models),
               "LS_API_KEY": "sk-never-copied"}
    text, unmapped, outcomes = import_llama_swap(LLAMA_SWAP_REAL, environ=environ)
    assert outcomes == REAL_OUTCOMES
    config = load(text)
    versioned = "/opt/llama.cpp/build/bin/llama-server-ec9e0301"
    assert config.llama_server.command == (versioned,)  # 2 models each; the first's wins
    assert list(config.profiles) == ["gpt-oss-20b", "qwen-coder", "qwen-coder-long", "embed"]

    def flags(name: str) -> list[str]:
        argv = argv_of(config, name)
        assert argv[:3] == [versioned, "--model", argv[2]]
        assert argv[3:9] == ["--host", "127.0.0.1", "--port", "5800", "--alias", name]
        return [argv[2], *argv[9:]]

    assert flags("gpt-oss-20b") == [
        f"{models}/gpt-oss-20b-mxfp4.gguf", "--ctx-size", "16384", "--temp", "0.7",
        "--top-p", "1.0", "-ngl", "99", "-fa", "on", "--jinja"]
    assert flags("qwen-coder") == [
        f"{models}/Qwen2.5-Coder-7B-Q4_K_M.gguf", "-c", "32768", "-ngl", "99", "-fa", "on",
        "--slot-save-path", "/var/cache/llama/qwen-coder"]
    assert flags("qwen-coder-long") == [  # the anchor's cmd with this model's macros
        f"{models}/Qwen2.5-Coder-7B-Q4_K_M.gguf", "-c", "131072", "-ngl", "99", "-fa", "on",
        "--slot-save-path", "/var/cache/llama/qwen-coder-long"]
    assert flags("embed") == [f"{models}/bge-m3-Q8_0.gguf", "--embedding", "--pooling", "cls",
                              "-c", "8192"]
    gpt = config.profiles["gpt-oss-20b"]
    assert gpt.display_name == "gpt-oss 20B"
    assert gpt.description == "gpt-oss-20b with 16384 tokens"
    assert gpt.aliases == ("gpt-4o-mini",) and gpt.ttl == 300
    assert config.profiles["qwen-coder"].ttl is None and config.profiles["embed"].ttl == 0
    assert config.profiles["qwen-coder-long"].aliases == ("coder-long",)
    assert gpt.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert (config.timeouts.start, config.timeouts.stop, config.ttl) == (500, 20, 0)
    assert config.progress.reasoning is True
    assert config.security.api_key_env == "LS_API_KEY"
    assert "sk-never-copied" not in text

    listed = "\n".join(unmapped)
    for where in ("logLevel", "logToStdout", "captureBuffer", "metricsMaxInMemory", "ui",
                  "performance", "upstream", "profiles", "selectors.coding-model",
                  "routing.router.settings.matrix", "routing.scheduler", "groups.group1",
                  "peers.openrouter", "models.gpt-oss-20b.useModelName",
                  "models.gpt-oss-20b.filters", "models.gpt-oss-20b.metadata",
                  "models.gpt-oss-20b.concurrencyLimit", "models.gpt-oss-20b.unloadTimeout",
                  "models.gpt-oss-20b.sendLoadingState", "models.gpt-oss-20b.capabilities",
                  "models.qwen-coder.unlisted", "models.qwen-coder.cmd",
                  "models.qwen-coder-long.cmd", "models.docker-llama", "models.vllm-qwen",
                  "models.gemma-hf", "models.whisper", "models.placeholder"):
        assert re.search(rf"^{re.escape(where)}: ", listed, re.M), where
    assert "temperature, top_p" in listed  # the filter says what it stripped
    # swap: false and persistent groups, and the preload, become residency settings.
    assert config.residency.mode == "budget" and config.profiles["gpt-oss-20b"].preload
    assert all(not re.search(rf"^{where}: ", listed, re.M)
               for where in ("groups.group2", "groups.forever", "hooks.on_startup.preload"))
    assert "#   api_key_env: OPENROUTER_API_KEY" in text  # read when swapd runs
    for model, why in REAL_OUTCOMES.items():
        if why != "imported":
            assert f"# not imported: {model} ({why}" in text, model

    # And `swapd check` passes it: flag names against llama-server's --help, model files.
    path = write_checkable(text, models, monkeypatch)
    fake = tmp_path / "bin" / "llama-server"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{HELP}{MORE_HELP}EOF\n")
    fake.chmod(0o755)
    capsys.readouterr()
    assert main(["check", str(path), "--llama-server", str(fake)]) == 0, capsys.readouterr().err


def write_checkable(text: str, models: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The imported example as a file, with its model files and its key's variable."""
    models.mkdir()
    for name in ("gpt-oss-20b-mxfp4.gguf", "Qwen2.5-Coder-7B-Q4_K_M.gguf", "bge-m3-Q8_0.gguf"):
        (models / name).write_bytes(b"GGUF")
    monkeypatch.setenv("LS_API_KEY", "sk-never-copied")  # swapd reads the key from there
    path = models.parent / "swapd.yaml"
    path.write_text(text)
    return path


@pytest.mark.real_llama
def test_llama_swaps_example_passes_check_against_the_real_llama_server(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    binary = find_llama_server()
    if binary is None:
        pytest.skip("no llama-server binary (set SWAPD_LLAMA_SERVER or build it with "
                    "tests/support/llama_build.py)")
    models = tmp_path / "models"
    text, _, _ = import_llama_swap(LLAMA_SWAP_REAL, environ={
        "LLAMA_HOME": "/opt/llama.cpp", "MODELS": str(models), "LS_API_KEY": "sk-x"})
    path = write_checkable(text, models, monkeypatch)
    assert main(["check", str(path), "--llama-server", str(binary)]) == 0, \
        capsys.readouterr().err


@pytest.mark.parametrize(("program", "imported"), [
    ("llama-server", True),
    ("llama-server-ec9e0301", True),
    ("/path/to/llama-server/llama-server-ec9e0301", True),
    ("/opt/llama.cpp/build/bin/llama-server", True),
    ("llama-server-cuda", True),
    ("llama-server.exe", True),
    ("LLAMA-SERVER.EXE", True),
    ("llama-server-b6200-vulkan.exe", True),
    ("llama_server", True),
    ("vllm", False),
    ("llama-cli", False),
    ("llama-serverx", False),
    ("llama-server.py", False),
    ("server.py", False),
    ("/usr/bin/python3", False),
    ("koboldcpp", False),
])
def test_llama_server_is_known_by_its_name_with_any_suffix(program: str,
                                                           imported: bool) -> None:
    text = f"models:\n  a: {{cmd: '{program} --port ${{PORT}} -m /m/a.gguf'}}\n  " \
           "b: {cmd: llama-server -m /m/b.gguf}\n"
    config_text, _, outcomes = import_llama_swap(text)
    name = program.rsplit("/", 1)[-1]
    if imported:
        assert outcomes["a"] == "imported"
    else:
        assert outcomes["a"].startswith(f"not llama-server: program {name!r}")
    assert ("a" in load(config_text).profiles) == imported


def test_cmd_comments_and_continuations_are_read_as_llama_swap_reads_them() -> None:
    text, unmapped, outcomes = import_llama_swap(r"""
macros:
  # a macro that spans lines, and one that carries its own comment line
  server: |
    llama-server
    --port ${PORT}
  threads: |
    # four cores
    -t 4
models:
  m:
    cmd: |
      # ${server} in a comment is never run, nor is a quote's "unclosed text
      ${server}
        #   indented comment: it's dropped too
      --model /m/x.gguf \
          --ctx-size 8192 \<blanks>
      -ot "blk\.(1[0-9])\.ffn_.*=CPU" \
      # between continued lines
      ${threads} --jinja
""".replace("<blanks>", "  \t "))  # blanks after a backslash: llama-swap trims them
    assert outcomes == {"m": "imported"} and unmapped == []
    config = load(text)
    assert argv_of(config, "m")[9:] == ["--ctx-size", "8192", "-ot",
                                        r"blk\.(1[0-9])\.ffn_.*=CPU", "-t", "4", "--jinja"]


def test_macros_expand_within_macros_and_a_cycle_is_reported() -> None:
    text, unmapped, outcomes = import_llama_swap("""
macros:
  bin: llama-server
  dir: /m
  file: ${dir}/${MODEL_ID}.gguf      # MODEL_ID of the model that uses it
  cmd: ${bin} --port ${PORT} -m ${file}
  late: ${later}                    # defined after its use: still expands
  later: -c 4096
  ping: ${pong}
  pong: --x ${ping}
  self: --y ${self}
  flag: true
  temp: 0.7
models:
  a: {cmd: "${cmd} ${late} --temp ${temp} --jinja-on ${flag}"}
  b: {cmd: "${cmd} ${ping}"}
  c: {cmd: "${cmd} ${self} ${nothing}"}
  d: {macros: {dir: /n}, cmd: "${cmd}"}
""")
    assert outcomes["a"] == "imported" and outcomes["d"] == "imported"
    config = load(text)
    assert argv_of(config, "a")[2] == "/m/a.gguf"
    assert argv_of(config, "a")[9:] == ["-c", "4096", "--temp", "0.7", "--jinja-on", "true"]
    assert argv_of(config, "d")[2] == "/n/d.gguf"  # the model's macro, inside a global one
    listed = "\n".join(unmapped)
    assert "models.b.cmd: the macros ping -> pong -> ping refer to each other in a circle" \
        in listed
    assert "models.c.cmd: the macros self -> self refer to each other in a circle" in listed
    assert "models.c.cmd: ${nothing} is not a defined macro" in listed


def test_a_macro_that_explodes_is_cut_off_not_expanded_forever() -> None:
    doubling = "\n".join(f"  m{i}: ${{m{i - 1}}}${{m{i - 1}}}" for i in range(1, 60))
    deep = "\n".join(f"  d{i}: ${{d{i + 1}}}" for i in range(400)) + "\n  d400: -c 1"
    text, unmapped, outcomes = import_llama_swap(
        f"macros:\n  m0: x\n{doubling}\n{deep}\nmodels:\n"
        "  big: {cmd: 'llama-server -m /m/a.gguf --x ${m59}'}\n"
        "  deep: {cmd: 'llama-server -m /m/a.gguf ${d0}'}\n"
        "  ok: {cmd: 'llama-server -m /m/a.gguf'}\n")
    assert set(outcomes.values()) == {"imported"}  # with the runaway macro left as written
    listed = "\n".join(unmapped)
    assert "models.big.cmd: ${m59} expands to more than 65536 characters" in listed
    assert "models.deep.cmd: ${d0} nests macros more than 64 deep" in listed
    assert len(text) < 20_000
    load(text)


def test_env_macros_are_read_from_the_environment_or_reported() -> None:
    source = """
macros:
  home: ${env.LLAMA_HOME}
models:
  a:
    cmd: ${home}/llama-server -m ${env.MODELS}/a.gguf -t ${env.THREADS}
    env: ["OMP_NUM_THREADS=${env.THREADS}"]
"""
    text, unmapped, outcomes = import_llama_swap(
        source, environ={"LLAMA_HOME": "/opt/l", "MODELS": "/m", "THREADS": "8"})
    config = load(text)
    assert outcomes == {"a": "imported"}
    assert argv_of(config, "a")[:3] == ["/opt/l/llama-server", "--model", "/m/a.gguf"]
    assert argv_of(config, "a")[9:] == ["-t", "8"]
    text, unmapped, outcomes = import_llama_swap(source, environ={})
    listed = "\n".join(unmapped)
    for var in ("LLAMA_HOME", "MODELS", "THREADS"):
        assert f"${{env.{var}}}: the environment variable {var} is not set here" in listed


@pytest.mark.parametrize("text", [
    "models: {a: {cmd: llama-server -m /m/a.gguf}}\nprofiles: [1, 2]\nselectors: 3\n"
    "routing: {router: [x], scheduler: {use: ~}}\ngroups: {g: [a]}\nhooks: [1]\n",
    "models: {a: {cmd: llama-server -m /m/a.gguf}}\nrouting: {router: {settings: 7}}\n"
    "selectors: {s: 5, t: {targets: 9}}\nprofiles: {p: ~}\n",
    "models: {a: {cmd: llama-server -m /m/a.gguf}}\ngroups: {g: {members: 5}}\n"
    "peers: {p: {proxy: 'http://x', models: true}}\nhooks: {on_startup: {preload: 5}}\n",
    "models: {a: {cmd: llama-server -m /m/a.gguf, macros: [1], aliases: 5, env: x,\n"
    "  filters: 3, name: [1], ttl: abc, proxy: 4}, b: 7, c: {cmd: [llama-server]},\n"
    "  d: {cmd: ''}}\nmacros: {x: {y: 1}, z: [1]}\n",
])
def test_unexpected_shapes_are_reported_never_a_crash(text: str) -> None:
    config_text, unmapped, outcomes = import_llama_swap(text)
    assert outcomes["a"] == "imported"
    assert unmapped
    load(config_text)


_WORDS = st.sampled_from([
    "llama-server", "/opt/llama-server-b1 --port ${PORT}", "-m", "/m/a.gguf", "--model",
    "-c", "4096", "${m}", "${env.HOME}", "${MODEL_ID}", "# note", "\\\n", "\n", "'", '"',
    "--jinja", "docker run", "vllm", "x\ny", "a: b", "#", "-hf", "env A=1", " "])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6),
                     st.floats(allow_nan=False), st.text(max_size=12),
                     st.lists(_WORDS, max_size=6).map("".join))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
_CMDS = st.lists(_WORDS, min_size=1, max_size=12).map(" ".join)


def _shaped(**keys: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """A mapping with some of ``keys`` (each value right or wrong), or any value at all."""
    return st.one_of(st.fixed_dictionaries({}, optional=keys), _SCALARS)


def _named(body: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(st.dictionaries(st.text(max_size=8), body, min_size=1, max_size=3),
                     _SCALARS)


_NAMES = st.one_of(st.lists(st.text(max_size=8), max_size=3), _SCALARS)
_GROUPS = _named(_shaped(members=_NAMES, swap=_VALUES, exclusive=_VALUES, persistent=_VALUES))
_TOP = {
    "healthCheckTimeout": _VALUES, "unloadTimeout": _VALUES, "globalTTL": _VALUES,
    "logLevel": _VALUES, "startPort": _VALUES, "sendLoadingState": _VALUES, "matrix": _VALUES,
    "metricsMaxInMemory": _VALUES, "profiles": _named(_VALUES),
    "apiKeys": st.one_of(st.lists(st.sampled_from(["k", "${env.K}", ""]), max_size=2),
                         _VALUES),
    "groups": _GROUPS,
    "hooks": _shaped(on_startup=_shaped(preload=_NAMES)),
    "peers": _named(_shaped(proxy=st.one_of(st.just("http://10.0.0.1"), _VALUES),
                            apiKey=_VALUES, models=_NAMES)),
    "selectors": _named(_shaped(targets=_NAMES, strategy=_VALUES)),
    "routing": _shaped(router=_shaped(use=_VALUES, settings=_shaped(groups=_GROUPS,
                                                                   matrix=_VALUES)),
                       scheduler=_VALUES),
}
_MODEL = _shaped(cmd=st.one_of(_CMDS, _VALUES), cmdStop=_VALUES, proxy=_VALUES,
                 aliases=_NAMES, env=_NAMES, checkEndpoint=_VALUES, ttl=_VALUES,
                 unlisted=_VALUES, useModelName=_VALUES, name=_VALUES, description=_VALUES,
                 filters=_shaped(stripParams=_VALUES, strip_params=_VALUES),
                 macros=_named(_VALUES), concurrencyLimit=_VALUES, metadata=_VALUES)


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(top=st.fixed_dictionaries({}, optional=_TOP),
       macros=st.dictionaries(st.sampled_from(["m", "n", "HOME"]), st.one_of(_CMDS, _VALUES),
                              max_size=3),
       models=st.dictionaries(st.text(max_size=8), st.one_of(
           st.fixed_dictionaries({"cmd": _CMDS}), _MODEL), max_size=4))
def test_any_llama_swap_config_imports_to_a_config_that_loads_or_says_why(
        top: dict[str, object], macros: dict[str, object],
        models: dict[str, object]) -> None:
    source = yaml.safe_dump({**top, "macros": macros, "models": models}, allow_unicode=True)
    try:
        text, unmapped, outcomes = import_llama_swap(source, environ={"HOME": "/home/u"})
    except ConfigError:
        return  # no model could be imported: refused, and said why
    load(text)
    assert set(outcomes) == set(map(str, yaml.safe_load(source)["models"]))
    assert all("\n" not in item for item in [*unmapped, *outcomes.values()])


MANIFEST = """\
llama_server: /opt/llama.cpp/llama-server
port: 8081
default: qwen-balanced
profiles:
  qwen-balanced:
    model: /models/Qwen3.6-27B-Q4_K_M.gguf
    name: Qwen 27B balanced
    ctx_size: 65536
    n_gpu_layers: 99
    flags: {flash-attn: "on", jinja: true}
    aliases: [qwen]
  qwen-long:
    model_path: /models/Qwen3.6-27B-Q4_K_M.gguf
    ttl: 30m
    flags: ["--flash-attn", "on", "-ctk", "q4_0", "-ctv", "q4_0", "-c", "131072"]
  embed: /models/embed.gguf
  broken:
    flags: {jinja: true}
"""


def test_a_sidecar_manifest_maps_almost_one_to_one() -> None:
    text, unmapped, _ = import_manifest(MANIFEST)
    config = load(text)
    assert config.llama_server.command == ("/opt/llama.cpp/llama-server",)
    assert list(config.profiles) == ["qwen-balanced", "qwen-long", "embed"]
    balanced = config.profiles["qwen-balanced"]
    assert balanced.display_name == "Qwen 27B balanced" and balanced.aliases == ("qwen",)
    assert argv_of(config, "qwen-balanced")[9:] == [
        "--flash-attn", "on", "--jinja", "--ctx-size", "65536", "--n-gpu-layers", "99"]
    assert argv_of(config, "qwen-long")[9:] == [
        "--flash-attn", "on", "-ctk", "q4_0", "-ctv", "q4_0", "-c", "131072"]
    assert config.profiles["qwen-long"].ttl == 1800
    assert config.profiles["qwen-long"].ctx_size == 131072
    assert [item.split(":")[0] for item in unmapped] == ["port", "default", "profiles.broken"]


def test_manifest_flags_given_twice_keep_the_last_and_say_so() -> None:
    text, unmapped, _ = import_manifest(
        "profiles: {a: {model: /m/a.gguf, ctx_size: 4096, flags: '-c 8192 --jinja'}}")
    config = load(text)
    assert argv_of(config, "a")[9:] == ["-c", "8192", "--jinja"]
    assert unmapped == ["profiles.a: ctx-size: 4096 and c: 8192 set the same flag "
                        "(--ctx-size); kept c: 8192"]


@pytest.mark.parametrize("text", [
    "profiles: {a: {model: /m/a.gguf, aliases: 5, flags: '-c \"x', args: \"-t '4\"}}",
    "profiles: {a: {model: -starts-like-a-flag.gguf, env: 5, ttl: [1]}, b: 7, c: {}}",
])
def test_manifest_shapes_that_make_no_sense_are_reported_never_a_crash(text: str) -> None:
    config_text, unmapped, outcomes = import_manifest(text)
    assert outcomes["a"] == "imported" and unmapped
    load(config_text)


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(top=st.dictionaries(st.sampled_from(["llama_server", "port", "default", "x"]), _VALUES,
                           max_size=2),
       profiles=st.dictionaries(st.text(max_size=8), st.one_of(
           st.text(max_size=12), _shaped(
               model=st.one_of(st.just("/m/a.gguf"), _VALUES), name=_VALUES, aliases=_NAMES,
               ttl=_VALUES, env=_VALUES, description=_VALUES, keep_cache=_VALUES,
               flags=st.one_of(_CMDS, _VALUES), args=st.one_of(_CMDS, _VALUES),
               ctx_size=_VALUES)), max_size=4))
@example(top={"llama_server": [""]}, profiles={"a": "/m/a.gguf"})  # found by exploring
def test_any_manifest_imports_to_a_config_that_loads_or_says_why(
        top: dict[str, object], profiles: dict[str, object]) -> None:
    source = yaml.safe_dump({**top, "profiles": profiles}, allow_unicode=True)
    try:
        text, _, outcomes = import_manifest(source)
    except ConfigError:
        return
    load(text)
    assert set(outcomes) == set(map(str, yaml.safe_load(source)["profiles"]))


def test_what_is_not_a_manifest_is_refused() -> None:
    with pytest.raises(ConfigError):
        import_manifest("models: 3")



def test_nothing_importable_is_an_error_that_says_why() -> None:
    with pytest.raises(ConfigError, match=r"v: not llama-server: program 'vllm' \(vLLM\)"):
        import_llama_swap("models:\n  v:\n    cmd: vllm serve m --port ${PORT}\n")
    with pytest.raises(ConfigError, match="looks like a llama-swap config"):
        import_manifest(LLAMA_SWAP)


def test_run_import_writes_the_config_and_lists_what_was_left_out(tmp_path: Path) -> None:
    source = tmp_path / "llama-swap.yaml"
    source.write_text(LLAMA_SWAP)
    target = tmp_path / "swapd.yaml"
    out, err = io.StringIO(), io.StringIO()
    assert run_import("llama-swap", source, target, out=out, err=err) == 0
    assert out.getvalue() == ""
    assert "groups.main" in err.getvalue() and f"swapd check {target}" in err.getvalue()
    assert "3 of 4 model(s) imported:\n  - qwen3-30b: imported\n" in err.getvalue()
    assert "  - vllm-llama: not imported: not llama-server: program 'vllm' (vLLM)\n" \
        in err.getvalue()
    config = load(target.read_text())  # ${env.MODELS_DIR} unset here: listed, not fatal
    assert "qwen3-30b" in config.profiles
    again = io.StringIO()
    assert run_import("llama-swap", source, target, out=out, err=again) == 1  # no overwrite
    assert "exists" in again.getvalue()
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(MANIFEST)
    assert run_import("manifest", manifest, None, out=out, err=err) == 0
    load(out.getvalue())
    assert run_import("manifest", source, None, out=out, err=err) == 1
    assert run_import("ollama", source, None, out=out, err=err) == 2
    assert run_import("manifest", tmp_path / "missing.yaml", None, out=out, err=err) == 1


def test_the_manifest_example_in_migration_md_imports() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "migration.md").read_text()
    (example,) = re.findall(r'^```yaml title="manifest"\n(.*?)^```$', page, re.M | re.S)
    text, unmapped, _ = import_manifest(example)
    config = load(text)
    assert unmapped == []
    assert list(config.profiles) == ["qwen-balanced", "qwen-long", "embed"]
    assert config.profiles["qwen-long"].ctx_size == 131072
    assert config.llama_server.env == {}  # only one profile set it
    assert config.profiles["qwen-balanced"].env == {"CUDA_VISIBLE_DEVICES": "0"}
