"""The JSON Schema of the config (``swapd.config.schema``) stays true to the loader.

Validation uses the ``jsonschema`` package where it is installed, and always a small
validator below for the subset of JSON Schema the generated schema uses, so these tests
run (and the two validators are checked against each other) either way.
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from swapd import config as cfg
from swapd.config import parse_config, parse_duration, parse_size
from swapd.config.schema import DESCRIPTIONS, SCHEMA_DIALECT, config_schema, schema_text
from swapd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "swapd.example.yaml"

Problems = list[tuple[list[str | int], str]]
Validator = Callable[[dict[str, Any], Any], Problems]


# --- validators ----------------------------------------------------------------------

def jsonschema_problems(schema: dict[str, Any], data: Any) -> Problems:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema)
    return [(list(error.absolute_path), error.message)
            for error in validator.iter_errors(data)]


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
}
_ANNOTATIONS = {"$schema", "title", "description", "default", "examples", "$defs"}


def mini_problems(schema: dict[str, Any], data: Any) -> Problems:
    """A validator for the keywords the generated schema uses; any other keyword fails."""
    root = schema

    def check(node: dict[str, Any], value: Any, path: list[str | int]) -> Iterator[
            tuple[list[str | int], str]]:
        for keyword, arg in node.items():
            if keyword in _ANNOTATIONS or keyword in ("properties", "additionalProperties"):
                continue
            if keyword == "$ref":
                name = arg.removeprefix("#/$defs/")
                yield from check(root["$defs"][name], value, path)
            elif keyword == "type":
                kinds = arg if isinstance(arg, list) else [arg]
                if not any(_TYPES[kind](value) for kind in kinds):
                    yield path, f"{value!r} is not of type {kinds}"
            elif keyword == "anyOf":
                if not any(not list(check(option, value, path)) for option in arg):
                    yield path, f"{value!r} is not valid under any of the given schemas"
            elif keyword == "not":
                if not list(check(arg, value, path)):
                    yield path, f"{value!r} should not be valid under {arg}"
            elif keyword == "const":
                if value != arg:
                    yield path, f"{arg!r} was expected"
            elif keyword == "pattern":
                if isinstance(value, str) and not re.search(arg, value):
                    yield path, f"{value!r} does not match {arg!r}"
            elif keyword in ("minimum", "maximum", "exclusiveMinimum"):
                if _TYPES["number"](value) and not {
                        "minimum": value >= arg, "maximum": value <= arg,
                        "exclusiveMinimum": value > arg}[keyword]:
                    yield path, f"{value!r} breaks {keyword} {arg}"
            elif keyword in ("minLength", "minItems", "minProperties"):
                sized = {"minLength": str, "minItems": list, "minProperties": dict}[keyword]
                if isinstance(value, sized) and len(value) < arg:
                    yield path, f"{value!r} is too short"
            elif keyword == "required":
                if isinstance(value, dict):
                    for name in arg:
                        if name not in value:
                            yield path, f"{name!r} is a required property"
            elif keyword == "items":
                if isinstance(value, list):
                    for index, item in enumerate(value):
                        yield from check(arg, item, [*path, index])
            elif keyword == "propertyNames":
                if isinstance(value, dict):
                    for name in value:
                        for _, message in check(arg, name, path):
                            yield path, f"property name {message}"
            else:
                raise AssertionError(f"the mini validator does not know {keyword!r}")
        if isinstance(value, dict) and ("properties" in node
                                        or "additionalProperties" in node):
            properties = node.get("properties", {})
            extra = node.get("additionalProperties", True)
            unexpected = []
            for name, item in value.items():
                if name in properties:
                    yield from check(properties[name], item, [*path, name])
                elif extra is False:
                    unexpected.append(name)
                elif isinstance(extra, dict):
                    yield from check(extra, item, [*path, name])
            if unexpected:
                listed = ", ".join(repr(name) for name in unexpected)
                yield path, (f"Additional properties are not allowed ({listed} "
                             f"{'was' if len(unexpected) == 1 else 'were'} unexpected)")

    return list(check(schema, data, []))


@pytest.fixture(params=["jsonschema", "mini"])
def problems(request: pytest.FixtureRequest) -> Callable[[Any], Problems]:
    validate: Validator = jsonschema_problems if request.param == "jsonschema" else mini_problems
    schema = config_schema()
    return lambda data: validate(schema, data)


def read(text: str) -> Any:
    """YAML as swapd reads it (only true/false are booleans: 'on' stays text)."""
    return yaml.load(text, Loader=cfg.StrictLoader)


# --- the schema itself ---------------------------------------------------------------

def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = config_schema()
    assert schema["$schema"] == SCHEMA_DIALECT
    jsonschema.Draft202012Validator.check_schema(schema)
    assert json.loads(schema_text()) == schema


def schema_keys(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every key the schema describes, spelled like docs/configuration.md's tables."""
    defs = schema["$defs"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        return defs[node["$ref"].removeprefix("#/$defs/")] if "$ref" in node else node

    def walk(node: dict[str, Any], prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for name, prop in node["properties"].items():
            key = f"{prefix}{name}"
            yield key, prop
            for option in [prop, *prop.get("anyOf", [])]:
                target = resolve(option)
                if "properties" in target:
                    yield from walk(target, key + ".")
            if name == "profiles" and not prefix:
                yield "profiles.NAME", prop["additionalProperties"]
                yield from walk(resolve(prop["additionalProperties"]), "profiles.NAME.")
            if name in ("fallbacks", "gpus") and not prefix:
                yield f"{name}[]", prop["items"]
                yield from walk(resolve(prop["items"]), f"{name}[].")

    return dict(walk(schema, ""))


def attrs_keys() -> set[str]:
    """Every field of every attrs class under Config, by the same spelling."""
    keys: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for field in attrs.fields(cls):
            if cls is cfg.Profile and field.name == "name":
                continue
            key = f"{prefix}{field.name}"
            keys.add(key)
            nested = hints[field.name]
            if isinstance(nested, type) and attrs.has(nested):
                walk(nested, key + ".")

    walk(cfg.Config, "")
    walk(cfg.Profile, "profiles.NAME.")
    walk(cfg.Fallback, "fallbacks[].")
    walk(cfg.Gpu, "gpus[].")
    return keys


def test_every_attrs_field_is_in_the_schema() -> None:
    described = set(schema_keys(config_schema())) - {"profiles.NAME", "fallbacks[]", "gpus[]"}
    assert attrs_keys() - described == set(), "fields missing from the schema"
    assert described - attrs_keys() == set(), "the schema names fields the code lacks"


def test_every_key_has_a_description_and_no_description_is_stale() -> None:
    keys = schema_keys(config_schema())
    undescribed = [key for key, node in keys.items() if not node.get("description")]
    assert undescribed == []
    assert set(DESCRIPTIONS) - set(keys) == set(), "DESCRIPTIONS names unknown keys"


def test_defaults_in_the_schema_are_the_code_defaults() -> None:
    keys = schema_keys(config_schema())
    defaults = cfg.Config(profiles={})
    assert keys["timeouts.start"]["default"] == defaults.timeouts.start == 120
    assert keys["queue.max_waiting"]["default"] == 10
    assert keys["security.max_body"]["default"] == 32 * 2**20
    assert keys["llama_server.command"]["default"] == ["llama-server"]
    assert "default" not in keys["state_dir"]  # computed from the environment


# --- what validates and what does not ------------------------------------------------

def test_the_example_config_validates(problems: Callable[[Any], Problems]) -> None:
    text = EXAMPLE.read_text()
    parse_config(text)  # the loader agrees
    assert problems(read(text)) == []


def test_the_test_suites_config_validates(problems: Callable[[Any], Problems],
                                          tmp_path: Path) -> None:
    from tests.test_api import config_text

    text = config_text(tmp_path, listen=9100, ttl=30)
    parse_config(text)
    assert problems(read(text)) == []


LOADABLE = [
    "listen: ':9001'\nprofiles: {a: {model: a.gguf}}",
    "listen: '[::1]:9001'\nprofiles: {a: {model: a.gguf}}",
    "listen: {host: 0.0.0.0, port: 9001}\nprofiles: {a: {model: a.gguf}}",
    "llama_server: {command: [env, X=1, llama-server], port: 8081, env: {N: 1}}\n"
    "profiles: {a: {model: a.gguf}}",
    "llama_server: {port: null}\ntimeouts:\nprofiles: {a: {model: a.gguf, ttl: null}}",
    "memory: {gpu: 24GiB}\nsecurity: {max_body: 1048576}\nprofiles: {a: {model: a.gguf}}",
    "profiles:\n  a:\n    model: a.gguf\n    aliases: solo\n    flags: {--ctx_size: 4096, "
    "fa: on, jinja: true, mmap: false, lora: [x.gguf, y.gguf], temp: 0.7, seed: null}",
    "profiles: {a: {model: a.gguf}}\nfallbacks:\n  - {name: r, base_url: 'http://h:1/v1', "
    "model: m, api_key_env: KEY, timeout: 2.5}",
]


@pytest.mark.parametrize("text", LOADABLE)
def test_what_the_loader_accepts_validates(problems: Callable[[Any], Problems],
                                           text: str) -> None:
    parse_config(text)
    assert problems(read(text)) == []


REFUSED = [  # (config, where the schema must point)
    ("profiles: {qwen: {model: q.gguf, flag: {jinja: true}}}", ["profiles", "qwen"]),
    ("timeouts: {start: soon}\nprofiles: {a: {model: a.gguf}}", ["timeouts", "start"]),
    ("timeouts: {stop: 0}\nprofiles: {a: {model: a.gguf}}", ["timeouts", "stop"]),
    ("queue: {max_waiting: -1}\nprofiles: {a: {model: a.gguf}}", ["queue", "max_waiting"]),
    ("logs: {max_bytes: 10 MiBs}\nprofiles: {a: {model: a.gguf}}", ["logs", "max_bytes"]),
    ("llama_server: {port: 0}\nprofiles: {a: {model: a.gguf}}", ["llama_server", "port"]),
    ("progress: {reasoning: yes}\nprofiles: {a: {model: a.gguf}}",
     ["progress", "reasoning"]),
    ("profiles: {a: {model: a.gguf, flags: {port: 8080}}}", ["profiles", "a", "flags"]),
    ("profiles: {a: {model: a.gguf, flags: {-m: x.gguf}}}", ["profiles", "a", "flags"]),
    ("profiles: {a: {model: a.gguf, flags: {ctx: {n: 1}}}}", ["profiles", "a", "flags", "ctx"]),
    ("profiles: {a: {model: a.gguf, aliases: [two words]}}", ["profiles", "a", "aliases"]),
    ("profiles: {a: {display_name: A}}", ["profiles", "a"]),
    ("profiles: {}", ["profiles"]),
    ("listen: localhost\nprofiles: {a: {model: a.gguf}}", ["listen"]),
    ("profiles: {a: {model: a.gguf}}\nfallbacks: [{name: r, base_url: ftp://h, model: m}]",
     ["fallbacks", 0, "base_url"]),
    ("security: {api_key_env: sk-123}\nprofiles: {a: {model: a.gguf}}",
     ["security", "api_key_env"]),
    ("ttl: 5m\nprofile: {a: {model: a.gguf}}", []),
]


@pytest.mark.parametrize(("text", "path"), REFUSED)
def test_what_the_loader_refuses_fails_at_the_right_path(
        problems: Callable[[Any], Problems], text: str, path: list[str | int]) -> None:
    with pytest.raises(ConfigError):
        parse_config(text)
    found = problems(read(text))
    assert found, "the schema accepted it"
    assert path in [where for where, _ in found], found


def test_a_typo_names_the_key(problems: Callable[[Any], Problems]) -> None:
    found = problems(read("profiles: {qwen: {model: q.gguf, flag: {jinja: true}}}"))
    assert found == [(["profiles", "qwen"],
                      "Additional properties are not allowed ('flag' was unexpected)")]


DURATIONS = ["0", "30", "1.5", ".5", "500ms", "30s", "2m", "1h", "1d", "1m30s", " 2m ",
             "1.5h", "soon", "30 s", "-1s", "1mm", "m", "", "1y", "1e3", "30S"]
SIZES = ["0", "1024", "1.5", "512KiB", "16MiB", "1GiB", "10MB", "1gb", "2 TiB", "7B",
         "1.5 GiB", "10 MiBs", "-1", "KiB", "", "1 PB", "1Gi"]


@pytest.mark.parametrize("text", DURATIONS)
def test_duration_pattern_matches_the_parser(text: str) -> None:
    pattern = config_schema()["properties"]["ttl"]["anyOf"][1]["pattern"]
    try:
        parse_duration(text)
        accepted = True
    except ValueError:
        accepted = False
    assert bool(re.search(pattern, text)) is accepted


@pytest.mark.parametrize("text", SIZES)
def test_size_pattern_matches_the_parser(text: str) -> None:
    pattern = config_schema()["$defs"]["Logs"]["properties"]["max_bytes"]["anyOf"][1][
        "pattern"]
    try:
        parse_size(text)
        accepted = True
    except ValueError:
        accepted = False
    assert bool(re.search(pattern, text)) is accepted


def test_mini_validator_agrees_with_jsonschema() -> None:
    pytest.importorskip("jsonschema")
    schema = config_schema()
    for text in [EXAMPLE.read_text(), *LOADABLE, *(text for text, _ in REFUSED)]:
        data = read(text)
        mini = sorted(repr(path) for path, _ in mini_problems(schema, data))
        real = sorted(repr(path) for path, _ in jsonschema_problems(schema, data))
        assert mini == real, text
