"""Importing llama-swap configs and router/sidecar manifests (``swapd.migrate``).

Every imported config must load with the real loader, build each profile's argv, and
validate against the config's JSON Schema; what cannot be carried over is listed.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import yaml

from swapd import config as cfg
from swapd.config import Config, parse_config
from swapd.errors import ConfigError
from swapd.flags import build_argv
from swapd.migrate import import_llama_swap, import_manifest, run_import
from swapd.schema import config_schema
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
    data = yaml.load(text, Loader=cfg._StrictLoader)
    assert mini_problems(config_schema(), data) == []
    return config


def argv_of(config: Config, name: str) -> list[str]:
    return build_argv(config, config.profiles[name], 5800)


def test_a_realistic_llama_swap_config_converts() -> None:
    text, unmapped = import_llama_swap(LLAMA_SWAP, environ=ENV)
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
    for what in ("groups.main", "groups.always-on", "swap: false", "hooks.on_startup.preload",
                 "models.vllm-llama", "vLLM",
                 "models.embed.unlisted", "logLevel", "SWAPD_LOG_LEVEL=warning",
                 "models.qwen3-30b.env: HF_TOKEN came from ${env.HF_TOKEN}: not copied"):
        assert what in listed, what
    assert not any(item.startswith(("startPort", "models.coder-32b.proxy")) for item in unmapped)
    # the list is also in the file, and the vllm model is kept there as a comment
    assert all(f"#   - {item}" in text for item in unmapped)
    assert re.search(r"^  # not imported: vllm-llama .*\n  #   vllm serve ", text, re.M)


def test_env_macros_that_are_not_set_are_listed() -> None:
    text, unmapped = import_llama_swap(LLAMA_SWAP, environ={})
    assert any("MODELS_DIR is not set" in item for item in unmapped)
    config = load(text)
    assert str(config.profiles["embed"].model) == "${env.MODELS_DIR}/bge-m3-Q8_0.gguf"
    assert any("relative" in item for item in unmapped)  # '${env...}/x' is no absolute path


def test_binaries_that_differ_use_the_most_common_and_say_so() -> None:
    text, unmapped = import_llama_swap("""
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
    text, unmapped = import_llama_swap("""
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
    text, unmapped = import_llama_swap("""
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
    text, unmapped = import_llama_swap("""
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
    assert "models.docker: runs a container (docker)" in listed
    assert "models.remote.proxy: 'http://10.0.0.5:9999'" in listed
    assert "models.remote.checkEndpoint" in listed


def test_peers_become_commented_out_fallbacks_and_keys_are_never_copied() -> None:
    text, unmapped = import_llama_swap("""
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
    quiet, _ = import_llama_swap("sendLoadingState: false\nmodels: {a: {cmd: llama-server "
                                 "-m /m/a.gguf}}")
    assert load(quiet).progress.reasoning is False
    default, _ = import_llama_swap("models: {a: {cmd: llama-server -m /m/a.gguf}}")
    assert load(default).progress.reasoning is True
    assert "swapd sends them by default" in default


@pytest.mark.parametrize("text", ["", "models: []", "- a", "models: {a: [unclosed"])
def test_what_is_not_a_llama_swap_config_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        import_llama_swap(text)


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
    text, unmapped = import_manifest(MANIFEST)
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
    text, unmapped = import_manifest(
        "profiles: {a: {model: /m/a.gguf, ctx_size: 4096, flags: '-c 8192 --jinja'}}")
    config = load(text)
    assert argv_of(config, "a")[9:] == ["-c", "8192", "--jinja"]
    assert unmapped == ["profiles.a: ctx-size: 4096 and c: 8192 set the same flag "
                        "(--ctx-size); kept c: 8192"]


def test_what_is_not_a_manifest_is_refused() -> None:
    with pytest.raises(ConfigError):
        import_manifest("models: 3")



def test_nothing_importable_is_an_error_that_says_why() -> None:
    with pytest.raises(ConfigError, match="runs vLLM"):
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
    text, unmapped = import_manifest(example)
    config = load(text)
    assert unmapped == []
    assert list(config.profiles) == ["qwen-balanced", "qwen-long", "embed"]
    assert config.profiles["qwen-long"].ctx_size == 131072
    assert config.llama_server.env == {}  # only one profile set it
    assert config.profiles["qwen-balanced"].env == {"CUDA_VISIBLE_DEVICES": "0"}
