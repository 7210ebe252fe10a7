"""The manifest: YAML reading rules, every value rule, every error message kind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from swapd.config import (
    Config,
    Fallback,
    FrozenDict,
    Listen,
    LlamaServer,
    Logs,
    Profile,
    Progress,
    Queue,
    Residency,
    Restart,
    Security,
    Timeouts,
    default_state_dir,
    load_config,
    missing_model_files,
    parse_config,
    parse_duration,
    parse_size,
)
from swapd.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "swapd.example.yaml"

MINIMAL = "profiles:\n  qwen: {model: /models/q.gguf}\n"


def problems_of(text: str, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, **kwargs)
    return caught.value.problems


def only_problem(text: str) -> str:
    (problem,) = problems_of(text)
    return problem


def flags_of(yaml_flags: str) -> dict[str, Any]:
    config = parse_config(f"profiles:\n  p:\n    model: m.gguf\n    flags: {yaml_flags}\n")
    return dict(config.profiles["p"].flags)


# --- YAML reading --------------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    ("on", "on"), ("off", "off"), ("yes", "yes"), ("no", "no"), ("y", "y"), ("n", "n"),
    ("On", "On"), ("OFF", "OFF"), ("Yes", "Yes"),
    ("true", True), ("false", False), ("True", True), ("FALSE", False), ("tRuE", True),
    ("null", None), ("~", None), ("", None),
    ("42", 42), ("-1", -1), ("0", 0), ("1_000", 1000), ("0x10", 16), ("0o17", 15),
    ("0.7", 0.7), ("1e3", 1000.0), ("-2.5e-3", -0.0025), (".5", 0.5),
    ("1:30", "1:30"),            # YAML 1.1 sexagesimal: would be 90
    ("1:30.5", "1:30.5"),
    ("0123", "0123"),            # YAML 1.1 octal: would be 83
    ("2024-01-01", "2024-01-01"),  # would be a date
    ("q8_0", "q8_0"),
])
def test_yaml_scalars(text: str, value: object) -> None:
    assert flags_of(f"{{x: {text}}}") == {"x": value}
    assert type(flags_of(f"{{x: {text}}}")["x"]) is type(value)


def test_flash_attn_on_stays_text() -> None:
    config = parse_config("profiles:\n  p:\n    model: m\n    flags:\n      flash-attn: on\n")
    assert config.profiles["p"].flags["flash-attn"] == "on"


def test_yaml_duplicate_key_is_an_error_with_its_line() -> None:
    problem = only_problem("profiles:\n  a: {model: x}\n  a: {model: y}\n")
    assert "found the key 'a' twice" in problem
    assert "line 3" in problem


def test_yaml_merge_keys_may_override() -> None:
    config = parse_config("""
profiles:
  a: &a {model: /m/a.gguf, flags: {ctx-size: 4096}}
  b: {<<: *a, flags: {ctx-size: 8192}}
""")
    assert config.profiles["b"].model == Path("/m/a.gguf")
    assert config.profiles["b"].ctx_size == 8192


def test_invalid_yaml_names_the_line() -> None:
    problem = only_problem("profiles:\n  a: [1\n  b: 2\n")
    assert problem.startswith("invalid YAML at line 3")


@pytest.mark.parametrize(("text", "problem"), [
    ("", "missing required key 'profiles' at the top level — add at least one profile"),
    ("- a\n- b\n", "expected a mapping of settings at the top level, got a list"),
    ("profiles: {}\n", "no profiles configured @ profiles — add at least one profile"),
    ("profiles:\n", "no profiles configured @ profiles"),
    ("profiles: [a, b]\n", "expected a mapping of profile names to profiles, got a list "
                           "@ profiles"),
])
def test_top_level_shape(text: str, problem: str) -> None:
    assert problem in only_problem(text)


# --- durations and sizes -------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    (30, 30.0), (0, 0.0), (1.5, 1.5), ("30", 30.0), ("2.5", 2.5),
    ("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("1d", 86400.0),
    ("1m30s", 90.0), ("1h2m3s", 3723.0), ("1.5s", 1.5), (" 10s ", 10.0), ("0s", 0.0),
])
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    "soon", "", "10 s", "1m 30s", "s", "10sec", "10S", "-1s", -1, True, None, [1],
    float("nan"), float("inf"), "1:30",
])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_parse_duration_message() -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration("soon")
    assert str(caught.value) == "expected a duration like 30s, 500ms or 2m, got 'soon'"


@pytest.mark.parametrize(("value", "size"), [
    (0, 0), (1024, 1024), ("1024", 1024), ("100B", 100), ("512KiB", 512 * 1024),
    ("16MiB", 16 * 2**20), ("1GiB", 2**30), ("1GB", 10**9), ("10MB", 10**7),
    ("2TiB", 2 * 2**40), ("1.5KiB", 1536), ("32mib", 32 * 2**20), ("4 KiB", 4096),
])
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["lots", "", "1K", "1M", "10 MiBs", "-1MiB", -1, True,
                                   1.5, None])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


# --- defaults and the example --------------------------------------------------------

def test_minimal_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    config = parse_config(MINIMAL)
    assert config.listen == Listen("127.0.0.1", 9001)
    assert config.state_dir == Path.home() / ".local" / "state" / "swapd"
    assert config.llama_server.command == ("llama-server",)
    assert config.llama_server.host == "127.0.0.1"
    assert config.llama_server.port is None
    assert config.llama_server.env == {}
    assert (config.timeouts.start, config.timeouts.stop, config.timeouts.queue_wait,
            config.timeouts.drain, config.timeouts.health_interval) == (120, 10, 120, 30, 0.02)
    assert (config.queue.max_waiting, config.queue.starvation_bound) == (10, 10)
    assert (config.restart.max_failures, config.restart.cooldown, config.restart.backoff,
            config.restart.backoff_max) == (3, 60, 1, 30)
    assert config.ttl == 0
    assert (config.progress.reasoning, config.progress.keepalive) == (True, 5)
    assert (config.logs.max_bytes, config.logs.tail_lines) == (10 * 2**20, 500)
    assert config.security.max_body == 32 * 2**20
    assert config.security.api_key_env is None
    assert config.fallbacks == ()
    profile = config.profiles["qwen"]
    assert profile == Profile("qwen", Path("/models/q.gguf"))
    assert profile.label == "qwen"
    assert profile.ttl is None
    assert profile.ctx_size is None


def test_state_dir_from_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/swapd:/var/lib/other")
    assert parse_config(MINIMAL).state_dir == Path("/var/lib/swapd")
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", "/x/state")
    assert default_state_dir() == Path("/x/state/swapd")


def test_empty_sections_mean_defaults() -> None:
    config = parse_config("timeouts:\nqueue:\nsecurity:\n" + MINIMAL)
    assert config.timeouts.start == 120


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert list(config.profiles) == ["qwen3.6-27b-balanced", "qwen3.6-27b-long", "qwen3-embed"]
    balanced = config.profiles["qwen3.6-27b-balanced"]
    assert balanced.flags["flash-attn"] == "on"
    assert balanced.flags["jinja"] is True
    assert balanced.ctx_size == 65536
    assert balanced.ttl == 1800
    assert balanced.label == "Qwen3.6 27B (balanced)"
    assert config.profiles["qwen3.6-27b-long"].model == balanced.model  # two on one GGUF
    assert [f.name for f in config.fallbacks] == ["openrouter", "lxc"]
    assert config.fallbacks[0].api_key_env == "OPENROUTER_API_KEY"
    assert config.resolve("qwen") is balanced
    assert set(missing_model_files(config)) == {
        f"model file not found: {p.model} @ profiles.{p.name}.model"
        for p in config.profiles.values()}


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for cls in (Config, LlamaServer, Timeouts, Queue, Restart, Progress, Logs, Security,
                Profile, Fallback, Residency):
        for field in attrs.fields(cls):
            if (cls, field.name) != (Profile, "name"):  # a profile's name is its key
                assert f" {field.name}:" in text or f"\n{field.name}:" in text, field.name


# --- values --------------------------------------------------------------------------

def test_durations_and_sizes_in_the_file() -> None:
    config = parse_config("""
timeouts: {start: 2m, stop: 500ms, queue_wait: 1m30s, drain: 0, health_interval: 5ms}
restart: {cooldown: 1h, backoff: 250ms, backoff_max: 1m}
progress: {keepalive: 2}
logs: {max_bytes: 512KiB, tail_lines: 0}
security: {max_body: 1GB}
ttl: 15m
""" + MINIMAL)
    assert (config.timeouts.start, config.timeouts.stop, config.timeouts.queue_wait,
            config.timeouts.drain) == (120, 0.5, 90, 0)
    assert config.timeouts.health_interval == pytest.approx(0.005)
    assert (config.restart.cooldown, config.restart.backoff, config.restart.backoff_max) == (
        3600, 0.25, 60)
    assert config.progress.keepalive == 2
    assert (config.logs.max_bytes, config.logs.tail_lines) == (512 * 1024, 0)
    assert config.security.max_body == 10**9
    assert config.ttl == 900


@pytest.mark.parametrize(("value", "listen"), [
    ("127.0.0.1:9001", Listen("127.0.0.1", 9001)),
    ("0.0.0.0:9001", Listen("0.0.0.0", 9001)),
    ("'[::1]:9001'", Listen("::1", 9001)),
    ("':9001'", Listen("127.0.0.1", 9001)),
    ("9002", Listen("127.0.0.1", 9002)),
    ("'9002'", Listen("127.0.0.1", 9002)),
    ("box.lan:80", Listen("box.lan", 80)),
    ("127.0.0.1:0", Listen("127.0.0.1", 0)),
    ("{host: 0.0.0.0, port: 8080}", Listen("0.0.0.0", 8080)),
])
def test_listen_forms(value: str, listen: Listen) -> None:
    assert parse_config(f"listen: {value}\n" + MINIMAL).listen == listen


@pytest.mark.parametrize(("value", "problem"), [
    ("'::1:9001'", "expected host:port like 127.0.0.1:9001, [::1]:9001 or :9001, got "
                   "'::1:9001' @ listen — write IPv6 addresses in brackets"),
    ("localhost", "expected host:port like 127.0.0.1:9001"),
    ("127.0.0.1:70000", "expected a port number from 0 to 65535, got 70000 @ listen"),
    ("true", "expected host:port like 127.0.0.1:9001"),
])
def test_listen_errors(value: str, problem: str) -> None:
    assert problem in only_problem(f"listen: {value}\n" + MINIMAL)


@pytest.mark.parametrize(("yaml", "expected"), [
    ("command: llama-server", ("llama-server",)),
    ("command: /opt/My Apps/llama-server", ("/opt/My Apps/llama-server",)),  # never split
    ("command: [env, GGML_X=1, llama-server, --threads, 4]",
     ("env", "GGML_X=1", "llama-server", "--threads", "4")),
])
def test_llama_server_command(yaml: str, expected: tuple[str, ...]) -> None:
    config = parse_config(f"llama_server:\n  {yaml}\n" + MINIMAL)
    assert config.llama_server.command == expected


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "'::1'", "'[::1]'", "localhost"])
def test_llama_server_host_loopback(host: str) -> None:
    config = parse_config(f"llama_server: {{host: {host}}}\n" + MINIMAL)
    assert config.llama_server.host == host.strip("'[]")


def test_llama_server_port_and_env() -> None:
    config = parse_config("llama_server: {port: 8081, env: {CUDA_VISIBLE_DEVICES: 0, "
                          "GGML_X: on}}\n" + MINIMAL)
    assert config.llama_server.port == 8081
    assert config.llama_server.env == {"CUDA_VISIBLE_DEVICES": "0", "GGML_X": "on"}
    assert parse_config("llama_server: {port: auto}\n" + MINIMAL).llama_server.port is None


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "swapd.yaml").write_text(
        "state_dir: state\nsecurity: {api_key_file: keys/api}\n"
        "profiles:\n  a: {model: models/a.gguf}\n  b: {model: /abs/b.gguf}\n"
        "  c: {model: ~/c.gguf}\n")
    config = load_config(tmp_path / "swapd.yaml")
    assert config.state_dir == tmp_path / "state"
    assert config.security.api_key_file == tmp_path / "keys" / "api"
    assert config.profiles["a"].model == tmp_path / "models" / "a.gguf"
    assert config.profiles["b"].model == Path("/abs/b.gguf")
    assert config.profiles["c"].model == Path.home() / "c.gguf"


def test_profile_fields() -> None:
    config = parse_config("""
profiles:
  qwen3.6-27b:
    model: /m/q.gguf
    display_name: Qwen 27B
    description: the big one
    aliases: qwen
    ttl: 30m
    env: {A: b}
    flags: {c: 4096, lora: [a.gguf, b.gguf]}
""")
    profile = config.profiles["qwen3.6-27b"]
    assert profile.name == "qwen3.6-27b"
    assert profile.aliases == ("qwen",)
    assert profile.ttl == 1800
    assert profile.env == {"A": "b"}
    assert profile.flags == {"c": 4096, "lora": ("a.gguf", "b.gguf")}
    assert profile.ctx_size == 4096
    assert profile.label == "Qwen 27B"
    assert profile.description == "the big one"


@pytest.mark.parametrize(("flags", "ctx"), [
    ({"ctx-size": 8192}, 8192), ({"c": 4096}, 4096), ({"n_ctx": 2048}, 2048),
    ({"--ctx_size": "1024"}, 1024), ({"ctx-size": 0}, None), ({}, None),
    ({"ctx-size": "auto"}, None), ({"ctx-size": True}, None),
])
def test_ctx_size(flags: dict[str, Any], ctx: int | None) -> None:
    assert Profile("p", Path("m"), flags=flags).ctx_size == ctx


def test_resolve_and_model_names() -> None:
    config = parse_config("""
profiles:
  a: {model: a.gguf, aliases: [alpha, first]}
  b: {model: b.gguf}
fallbacks:
  - {name: remote, base_url: https://x.example/v1, model: upstream/model}
""")
    assert config.model_names() == ["a", "alpha", "first", "b", "remote"]
    assert config.resolve("a") is config.profiles["a"]
    assert config.resolve("first") is config.profiles["a"]
    assert config.resolve("b") is config.profiles["b"]
    assert config.resolve("remote") is config.fallbacks[0]
    assert config.resolve("upstream/model") is config.fallbacks[0]
    assert config.resolve("nope") is None
    assert config.resolve("A") is None


def test_fallbacks() -> None:
    config = parse_config(MINIMAL + """
fallbacks:
  - name: openrouter
    base_url: https://openrouter.ai/api/v1/
    api_key_env: OPENROUTER_API_KEY
    model: deepseek/deepseek-v4-flash
    timeout: 3s
""")
    assert config.fallbacks == (Fallback("openrouter", "https://openrouter.ai/api/v1",
                                         "deepseek/deepseek-v4-flash", "OPENROUTER_API_KEY",
                                         3.0),)


def test_config_is_frozen_hashable_and_comparable() -> None:
    one, two = parse_config(MINIMAL), parse_config(MINIMAL)
    assert one == two
    assert hash(one) == hash(two)
    with pytest.raises(AttributeError):
        one.ttl = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        one.profiles["x"] = one.profiles["qwen"]  # type: ignore[index]
    assert isinstance(one.profiles, FrozenDict)


def test_direct_construction_freezes_collections() -> None:
    profile = Profile("p", "m.gguf", aliases=["x"], flags={"lora": ["a"]})
    assert profile.model == Path("m.gguf")
    assert profile.aliases == ("x",)
    assert profile.flags["lora"] == ("a",)
    hash(profile)


# --- error messages ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "problem"), [
    # unknown keys, with close matches
    ("profiles:\n  qwen: {model: m, flag: {c: 1}}\n",
     "unknown key 'flag' @ profiles.qwen — did you mean 'flags'?"),
    ("profile:\n  qwen: {model: m}\n" + MINIMAL,
     "unknown key 'profile' at the top level — did you mean 'profiles'?"),
    ("timeouts: {queue-wait: 3s}\n" + MINIMAL,
     "unknown key 'queue-wait' @ timeouts — did you mean 'queue_wait'?"),
    ("timeouts: {zzz: 3s}\n" + MINIMAL,
     "unknown key 'zzz' @ timeouts — known keys here: start, stop, queue_wait"),
    ("profiles:\n  qwen: {model: m, ctx-size: 4096}\n",
     "unknown key 'ctx-size' @ profiles.qwen — llama-server flags go under 'flags:'"),
    ("profiles:\n  qwen: {model: m, name: other}\n",
     "unknown key 'name' @ profiles.qwen — a profile's name is its key, 'qwen'"),
    # values
    ("timeouts: {start: soon}\n" + MINIMAL,
     "expected a duration like 30s, 500ms or 2m, got 'soon' @ timeouts.start"),
    ("timeouts: {stop: 0}\n" + MINIMAL, "must be more than 0s, got 0 @ timeouts.stop"),
    ("timeouts: {drain: -1s}\n" + MINIMAL,
     "expected a duration like 30s, 500ms or 2m, got '-1s' @ timeouts.drain"),
    ("timeouts: {drain: -1}\n" + MINIMAL,
     "a duration must be a finite number of seconds, 0 or more, got -1 @ timeouts.drain"),
    ("queue: {max_waiting: -1}\n" + MINIMAL, "must be at least 0, got -1 @ queue.max_waiting"),
    ("queue: {max_waiting: 2.5}\n" + MINIMAL,
     "expected a whole number, got 2.5 @ queue.max_waiting"),
    ("queue: {max_waiting: '10'}\n" + MINIMAL,
     "expected a whole number, got '10' @ queue.max_waiting"),
    ("restart: {max_failures: 0}\n" + MINIMAL,
     "must be at least 1, got 0 @ restart.max_failures"),
    ("restart: {backoff: 10s, backoff_max: 5s}\n" + MINIMAL,
     "must be at least backoff (10s), got 5s @ restart.backoff_max"),
    ("progress: {reasoning: on}\n" + MINIMAL,
     "expected true or false, got 'on' @ progress.reasoning — only true and false are "
     "booleans"),
    ("logs: {max_bytes: lots}\n" + MINIMAL,
     "expected a size like 512KiB, 16MiB or 1GiB, got 'lots' @ logs.max_bytes"),
    ("security: {max_body: 0}\n" + MINIMAL,
     "must be more than 0 bytes, got 0 @ security.max_body"),
    ("ttl: -5\n" + MINIMAL, "0 or more, got -5 @ ttl"),
    ("timeouts: 30s\n" + MINIMAL, "expected a mapping of settings, got '30s' @ timeouts"),
    ("profiles:\n  qwen: {model: m, display_name: 2024}\n",
     "expected text, got 2024 @ profiles.qwen.display_name — quote it: '2024'"),
    ("profiles:\n  qwen: {model: m, ttl: forever}\n",
     "expected a duration like 30s, 500ms or 2m, got 'forever' @ profiles.qwen.ttl"),
    ("profiles:\n  qwen: {model: m, aliases: {a: 1}}\n",
     "expected a list of names, got a mapping @ profiles.qwen.aliases"),
    ("profiles:\n  qwen: {model: m, aliases: [a, 3]}\n",
     "expected text, got 3 @ profiles.qwen.aliases[1]"),
    ("profiles:\n  qwen: {model: m, env: {'A B': x}}\n",
     "'A B' is not an environment variable name @ profiles.qwen.env"),
    ("profiles:\n  qwen: {model: m, env: {A: true}}\n",
     "expected text, got true @ profiles.qwen.env.A — quote it: 'true'"),
    ("profiles:\n  qwen: {model: ''}\n", "must not be empty @ profiles.qwen.model"),
    # required keys and shapes
    ("profiles:\n  qwen: {display_name: Q}\n",
     "missing required key 'model' @ profiles.qwen — the path of the .gguf file to load"),
    ("profiles:\n  qwen:\n", "missing required key 'model' @ profiles.qwen"),
    ("profiles:\n  qwen: /models/q.gguf\n",
     "expected the profile's settings as a mapping, got '/models/q.gguf' @ profiles.qwen — "
     "write 'model: /models/q.gguf' on its own line under 'qwen:'"),
    # llama_server
    ("llama_server: {host: 0.0.0.0}\n" + MINIMAL,
     "must be a loopback address (127.0.0.1, ::1 or localhost), got '0.0.0.0' "
     "@ llama_server.host — the child always binds loopback; set 'listen' to serve a LAN"),
    ("llama_server: {port: 0}\n" + MINIMAL,
     "expected 'auto' or a port number from 1 to 65535, got 0 @ llama_server.port"),
    ("llama_server: {port: automatic}\n" + MINIMAL,
     "expected 'auto' or a port number from 1 to 65535, got 'automatic'"),
    ("llama_server: {port: 9001}\n" + MINIMAL,
     "port 9001 is also swapd's listen port @ llama_server.port — choose another port or "
     "'auto'"),
    ("llama_server: {command: []}\n" + MINIMAL,
     "the command is empty @ llama_server.command — name the llama-server program"),
    ("llama_server: {command: [llama-server, true]}\n" + MINIMAL,
     "expected text, got true @ llama_server.command[1]"),
    ("llama_server: {env: [A]}\n" + MINIMAL,
     "expected a mapping of variable names to values, got a list @ llama_server.env"),
    # security
    ("security: {api_key_env: sk-or-v1-abcdef}\n" + MINIMAL,
     "expected the name of an environment variable, like OPENROUTER_API_KEY "
     "@ security.api_key_env — put the key itself in that variable"),
    ("security: {admin_key_env: A, admin_key_file: /k}\n" + MINIMAL,
     "set admin_key_env or admin_key_file, not both @ security"),
    # flags
    ("profiles:\n  qwen: {model: m, flags: {port: 8080}}\n",
     "profiles.qwen.flags: 'port' is set by swapd; remove it (swapd passes --port itself)"),
    ("profiles:\n  qwen: {model: m, flags: {--host: 0.0.0.0}}\n",
     "profiles.qwen.flags: '--host' is set by swapd; remove it (swapd passes --host itself)"),
    ("profiles:\n  qwen: {model: m, flags: {m: x.gguf}}\n",
     "profiles.qwen.flags: 'm' is set by swapd; remove it (swapd passes --model itself) — "
     "set the profile's 'model' key instead"),
    ("profiles:\n  qwen: {model: m, flags: {c: 1, ctx_size: 2}}\n",
     "profiles.qwen.flags: 'c' and 'ctx_size' both set --ctx-size; keep one"),
    ("profiles:\n  qwen: {model: m, flags: {lora: {a: 1}}}\n",
     "profiles.qwen.flags: 'lora' must be text, a number, true, false, null or a list"),
    ("profiles:\n  qwen: {model: m, flags: {lora: [true]}}\n",
     "profiles.qwen.flags: 'lora': list items must be text or numbers, got true"),
    ("profiles:\n  qwen: {model: m, flags: {'ctx-size 4096': true}}\n",
     "profiles.qwen.flags: 'ctx-size 4096' is not a flag name"),
    ("profiles:\n  qwen: {model: m, flags: [ctx-size]}\n",
     "profiles.qwen.flags: expected a mapping of llama-server flag names to values"),
    # names
    ("profiles:\n  a: {model: m, aliases: [qwen]}\n  b: {model: m, aliases: [qwen]}\n",
     "duplicate name 'qwen' @ profiles.b.aliases — already used by profile 'a'"),
    ("profiles:\n  a: {model: m, aliases: [b]}\n  b: {model: m}\n",
     "duplicate name 'b' @ profiles.a.aliases — already used by profile 'b'"),
    ("profiles:\n  a: {model: m, aliases: [a]}\n",
     "duplicate name 'a' @ profiles.a.aliases — already used by profile 'a'"),
    (MINIMAL + "fallbacks:\n  - {name: qwen, base_url: http://x/v1, model: m}\n",
     "duplicate name 'qwen' @ fallbacks[0].name — already used by profile 'qwen'"),
    ("profiles:\n  my model: {model: m}\n",
     "invalid name 'my model' @ profiles — use letters, digits and . _ : / @ + - only"),
    ("profiles:\n  a: {model: m, aliases: [\"q\\twen\"]}\n",
     "invalid name 'q\\twen' @ profiles.a.aliases"),
    ("profiles:\n  a: {model: m, aliases: ['']}\n", "invalid name '' @ profiles.a.aliases"),
    ("profiles:\n  a: {model: m, aliases: [x#y]}\n", "invalid name 'x#y'"),
    ("profiles:\n  1: {model: m}\n", "a name must be text, got 1 @ profiles — quote it: '1'"),
    # fallbacks
    (MINIMAL + "fallbacks:\n  - {name: f, base_url: ftp://x, model: m}\n",
     "expected an http:// or https:// URL, got 'ftp://x' @ fallbacks[0].base_url"),
    (MINIMAL + "fallbacks:\n  - {name: f, base_url: http://x/v1, model: m}\n"
     "  - {name: g, base_url: x.example/v1, model: m}\n",
     "expected an http:// or https:// URL, got 'x.example/v1' @ fallbacks[1].base_url"),
    (MINIMAL + "fallbacks:\n  - {name: f, base_url: 'https://x/v1/chat/completions', "
     "model: m}\n",
     "expected the API's base URL, got the endpoint 'https://x/v1/chat/completions'"),
    (MINIMAL + "fallbacks:\n  - {name: f, base_url: http://x/v1}\n",
     "missing required key 'model' @ fallbacks[0]"),
    (MINIMAL + "fallbacks:\n  - {name: f, base_url: http://x/v1, model: m, timeout: 0}\n",
     "must be more than 0s, got 0 @ fallbacks[0].timeout"),
    (MINIMAL + "fallbacks:\n  - {name: f, base_url: http://x/v1, model: m, api_key: k}\n",
     "unknown key 'api_key' @ fallbacks[0] — did you mean 'api_key_env'?"),
    (MINIMAL + "fallbacks:\n  name: f\n",
     "expected a list of fallbacks, got a mapping @ fallbacks — start each one with '- name:'"),
    # gpus and residency
    (MINIMAL + "gpus: [{id: 0, memory: 24GiB}, {id: 0, memory: 8GiB}]\n",
     "GPU 0 is listed twice @ gpus[1].id"),
    (MINIMAL + "gpus: [{id: 0}]\n", "missing required key 'memory' @ gpus[0]"),
    (MINIMAL + "gpus: [{id: 0, memory: lots}]\n",
     "expected a size like 512KiB, 16MiB or 1GiB, got 'lots' @ gpus[0].memory"),
    ("gpus: [{id: 0, memory: 24GiB}]\nprofiles:\n  q: {model: m, gpu: 1}\n",
     "GPU 1 is not in gpus (0) @ profiles.q.gpu — add it to gpus or use gpu: auto"),
    ("profiles:\n  q: {model: m, gpu: [0, 0]}\n", "GPU 0 is listed twice @ profiles.q.gpu"),
    ("profiles:\n  q: {model: m, gpu: first}\n",
     "expected 'auto', a GPU id (0, 1, ...) or a list of ids, got 'first' @ profiles.q.gpu"),
    (MINIMAL + "residency: {mode: vram}\n",
     "expected 'count' or 'budget', got 'vram' @ residency.mode"),
    ("profiles:\n  a: {model: m, pinned: true}\n  b: {model: m, pinned: true}\n",
     "2 profiles are pinned (a, b) but at most 1 model(s) may be loaded at once @ residency"
     " — raise residency.max_models or use residency.mode: budget"),
])
def test_error_messages(text: str, problem: str) -> None:
    problems = problems_of(text)
    assert any(problem in found for found in problems), problems


def test_residency_defaults_keep_one_model_at_a_time() -> None:
    config = parse_config(MINIMAL)
    assert config.residency.cap == 1 and config.gpus == ()
    budget = parse_config(MINIMAL + "residency: {mode: budget}\n"
                          "gpus: [{id: 0, memory: 24GiB}, {id: 1, memory: 48GiB}]\n")
    assert budget.residency.cap is None
    assert [(g.id, g.memory) for g in budget.gpus] == [(0, 24 * 2**30), (1, 48 * 2**30)]
    split = parse_config("profiles:\n  q: {model: m, gpu: [0, 1], pinned: true, "
                         "memory: 30GiB}\n")
    assert split.profiles["q"].gpu == (0, 1) and split.profiles["q"].memory == 30 * 2**30
    assert parse_config("profiles:\n  q: {model: m, gpu: 1}\n").profiles["q"].gpu == (1,)


def test_every_problem_is_reported_not_just_the_first() -> None:
    problems = problems_of("""
listen: nowhere
bogus: 1
timeouts: {start: soon, stop: 0}
queue: {max_waiting: -1}
progress: {reasoning: yes}
profiles:
  a: {model: m, aliases: [qwen]}
  b:
    model: m
    aliases: [qwen]
    flag: {}
    flags: {port: 1, c: 1, ctx-size: 2}
  c: {}
fallbacks:
  - {name: f, base_url: ftp://x, model: m}
""")
    expected = [
        "duplicate name 'qwen' @ profiles.b.aliases",
        "@ listen",
        "unknown key 'bogus' at the top level",
        "got 'soon' @ timeouts.start",
        "@ timeouts.stop",
        "@ queue.max_waiting",
        "@ progress.reasoning",
        "profiles.b.flags: 'port' is set by swapd",
        "profiles.b.flags: 'c' and 'ctx-size' both set --ctx-size",
        "unknown key 'flag' @ profiles.b",
        "missing required key 'model' @ profiles.c",
        "@ fallbacks[0].base_url",
    ]
    for fragment in expected:
        assert any(fragment in problem for problem in problems), (fragment, problems)
    assert len(problems) == len(expected), problems


def test_config_error_names_its_source(tmp_path: Path) -> None:
    path = tmp_path / "swapd.yaml"
    path.write_text("timeouts: {start: soon}\n" + MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path)
    assert str(caught.value).startswith(f"{path}: 1 problem(s):")


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")
    assert caught.value.problems == ["cannot read the config file: No such file or directory"]
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path)


def test_config_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "swapd.yaml"
    path.write_bytes(b"profiles: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_missing_model_files(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "dir.gguf").mkdir()
    config = parse_config("profiles:\n  a: {model: a.gguf}\n  b: {model: b.gguf}\n"
                          "  c: {model: dir.gguf}\n", base_dir=tmp_path)
    assert missing_model_files(config) == [
        f"model file not found: {tmp_path / 'b.gguf'} @ profiles.b.model",
        f"model path is not a file: {tmp_path / 'dir.gguf'} @ profiles.c.model",
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_model_file(tmp_path: Path) -> None:
    model = tmp_path / "a.gguf"
    model.write_bytes(b"GGUF")
    model.chmod(0)
    config = parse_config("profiles:\n  a: {model: a.gguf}\n", base_dir=tmp_path)
    assert missing_model_files(config) == [
        f"model file is not readable: {model} @ profiles.a.model"]


def test_a_path_under_an_unknown_users_home_is_a_clear_problem() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config("profiles:\n  a: {model: ~no-such-user-h13/a.gguf}\n")
    assert raised.value.problems == [
        "'~no-such-user-h13/a.gguf': there is no user 'no-such-user-h13' whose home "
        "directory '~no-such-user-h13' could mean; write the path out @ profiles.a.model"]
