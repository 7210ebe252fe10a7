"""Import configs of the tools swapd replaces: llama-swap, and router + sidecar manifests.

Both importers return an :class:`Imported`: a commented swapd YAML config, the list of
what could not be carried over (each item naming where it was and what to do instead),
and for each model of the source whether it was imported and why not. The config they
write always loads (:func:`swapd.config.parse_config`), and every profile's argv builds
(:func:`swapd.config.argv.build_argv`); what they cannot express is left out and listed, never
guessed. ``swapd check`` is the next step: it checks flag names against the real
``llama-server --help`` and that the model files exist.

:func:`import_llama_swap` reads llama-swap's format: ``models`` with a ``cmd`` command
line (``${macros}``, ``${PORT}``, ``${MODEL_ID}``, ``${env.VAR}``), ``ttl``, ``aliases``,
``env``, ``name``, ``description``; the top-level ``macros``, ``healthCheckTimeout``,
``unloadTimeout``, ``globalTTL``, ``sendLoadingState``, ``apiKeys``, ``groups``,
``matrix``, ``hooks`` and ``peers``; what it cannot express (``routing``, ``profiles``,
``selectors``, ``filters``, ...) is listed. Each ``cmd`` is read as llama-swap reads it:
``#`` comment lines dropped before macros are expanded (a comment may name a macro),
macros expanded (within macros too, with a guard against cycles), comment lines dropped
again, a line ending in ``\\`` joined to the next, then split like a shell would
(``shlex``). A program named ``llama-server`` (any directory, any ``-SUFFIX``, ``.exe``)
becomes ``llama_server.command``, ``--model``/``-m`` the profile's ``model``,
``--port``/``--host`` are dropped (swapd owns them) and every other option becomes a
``flags`` entry (``true`` for a bare flag, a list for a repeated one).

:func:`import_manifest` reads the manifest of a "router on one box, sidecar on the GPU
host" setup: ``profiles:`` (or ``models:``) of ``{model, flags}`` where any other key is
a llama-server flag (``ctx_size: 65536``). ``docs/migration.md`` describes both formats.
"""

from __future__ import annotations

import collections
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple, TextIO, TypeGuard
from urllib.parse import urlsplit

from swapd import config as cfg
from swapd.cli.draft import (
    Draft,
    DraftProfile,
    one_line,
    render,
    scalar,
)
from swapd.config.flags import FlagValue, canonical_flag, format_value, normalize_flag
from swapd.errors import ConfigError

__all__ = ["IMPORTERS", "Imported", "import_llama_swap", "import_manifest", "run_import"]


_MACRO = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_DECIMAL = re.compile(r"-?[0-9]+\.[0-9]+")
_NUMBERISH = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_LLAMA_SERVER = re.compile(r"llama[-_]server(?:-[^\s/\\]+)?(?:\.exe)?", re.IGNORECASE)
"""The name of the program: ``llama-server``, ``llama-server-ec9e0301``, ``llama-server.exe``."""
_DOWNLOADS = ("hf-repo", "hf-file", "model-url", "docker-repo")
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0")
_MAX_MACRO_DEPTH = 64
"""Macros within macros deeper than this are left unexpanded (and listed)."""
_MAX_EXPANDED_CHARS = 65536
"""A macro that expands to more than this (``${a}${a}`` over and over) is left as is."""
_CONTAINER_ENGINES = ("docker", "podman", "nerdctl")
_KNOWN_ENGINES = {
    "vllm": "vLLM", "python": "a Python program", "python3": "a Python program",
    "sglang": "SGLang", "koboldcpp": "KoboldCpp", "tabbyapi": "TabbyAPI",
    "ollama": "Ollama", "whisper-server": "whisper.cpp's server",
    "sd-server": "stable-diffusion.cpp's server",
}


class Imported(NamedTuple):
    """What an importer made of a source config."""

    config: str
    """The swapd config, as commented YAML."""
    unmapped: list[str]
    """What could not be carried over, one line each: ``where: what, and what to do``."""
    models: dict[str, str]
    """For each model (profile) of the source: ``"imported"``, or why it was not."""


# --- llama-swap ----------------------------------------------------------------------

_MODEL_KEYS_HANDLED = {"cmd", "macros", "ttl", "aliases", "env", "name", "description",
                       "proxy", "checkEndpoint"}
_MODEL_TEXT_KEYS = ("name", "description", "proxy", "checkEndpoint")  # macros apply

_MODEL_KEYS_LOST = {
    "cmdStop": "swapd stops llama-server itself (SIGTERM to its process group, SIGKILL "
               "after timeouts.stop); the stop command is not run",
    "unlisted": "swapd lists every profile in /v1/models; the model is listed",
    "useModelName": "swapd forwards the request's model name unchanged (llama-server "
                    "does not route by it)",
    "filters": "swapd does not rewrite request parameters (stripParams, setParams, "
               "setParamsByID); set sampling defaults with llama-server flags "
               "(temp, top-p, ...) in the profile's flags",
    "metadata": "swapd's /v1/models has no free-form metadata",
    "concurrencyLimit": "concurrency is llama-server's --parallel (a flag); swapd's "
                        "queue.max_waiting bounds the requests that wait",
    "sendLoadingState": "swapd's progress.reasoning is one setting for all profiles",
    "timeouts": "swapd's connection timeouts to llama-server are not per profile",
    "unloadTimeout": "swapd's timeouts.stop is one setting for all profiles",
    "capabilities": "swapd's /v1/models reports each profile's context length; other "
                    "capabilities are not listed",
    "compat": "swapd has no per-model compatibility settings",
}

_TOP_KEYS_LOST = {
    "logTimeFormat": "swapd's log lines are formatted by its logging setup (journald "
                     "adds timestamps under systemd)",
    "logToStdout": "swapd logs to stderr; the child's output goes to "
                   "state_dir/llama-server.log and GET /swapd/logs",
    "metricsMaxInMemory": "swapd exports Prometheus metrics at GET /metrics instead",
    "captureBuffer": "swapd does not capture request and response bodies",
    "includeAliasesInList": "swapd's /v1/models lists each profile once, with its "
                            "aliases in the entry's 'aliases' field",
    "logRequests": "swapd has no such setting; SWAPD_LOG_LEVEL sets how much it logs",
    "ui": "swapd's status page at / has no settings",
    "performance": "swapd does not sample system statistics; GET /metrics has its own",
    "upstream": "only inference requests (POST /v1/...) load a model in swapd; other "
                "paths never do, so there is nothing to ignore",
    "profiles": "llama-swap's profiles (sets of models, pinned names) have no swapd "
                "equivalent: each model above is a swapd profile of its own, asked for by "
                "its name or an alias",
    "matrix": "swapd runs one model at a time; sets of models that run together are not "
              "possible, every profile swaps with every other",
}


def import_llama_swap(text: str, *, environ: Mapping[str, str] | None = None) -> Imported:
    """A swapd config (commented YAML) from llama-swap config ``text``, what could not be
    carried over (one line each, ``where: what and what to do``), and for each model
    whether it was imported or why not.

    ``${env.VAR}`` macros are read from ``environ`` (default: ``os.environ``); a variable
    that is not set stays in the text and is listed. Raises :class:`ConfigError` when
    ``text`` is not YAML, has no ``models`` mapping, or no model could be imported.
    """
    source = "llama-swap config"
    data = cfg.read_yaml(text, source)
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), Mapping):
        raise ConfigError(["expected a llama-swap config: a mapping with 'models:'"],
                          source=source)
    env = os.environ if environ is None else environ
    draft = Draft(source="llama-swap")
    macros = _string_macros(data.get("macros"), "macros", draft)

    for key, value in data.items():
        _llama_swap_top(str(key), value, draft)
    if draft.reasoning is None:
        draft.reasoning_note = ("llama-swap sent no loading messages unless "
                                "sendLoadingState: true; swapd sends them by default")

    binaries: dict[str, str] = {}  # profile name -> program
    for model_id, body in data["models"].items():
        _llama_swap_model(str(model_id), body, macros, env, draft, binaries)

    _choose_command(draft, binaries)
    _lift_common_env(draft)
    _require_profiles(draft, source)
    return Imported(render(draft), draft.unmapped, draft.outcomes)


def _llama_swap_top(key: str, value: Any, draft: Draft) -> None:
    if key in ("models", "macros"):
        return
    if key == "healthCheckTimeout":
        if _is_number(value) and value > 0:
            draft.start_timeout = max(float(value), 15.0)  # llama-swap's own minimum
        else:
            draft.lose(key, f"expected seconds, got {value!r}; timeouts.start left at "
                       "its default (120s)")
    elif key == "unloadTimeout":
        if _is_number(value) and value > 0:
            draft.stop_timeout = float(value)
        else:
            draft.lose(key, f"expected seconds, got {value!r}; timeouts.stop left at "
                       "its default (10s)")
    elif key == "globalTTL":
        if _is_number(value) and value >= 0:
            draft.ttl = float(value)
        else:
            draft.lose(key, f"expected seconds, got {value!r}; ttl left at 0 (never)")
    elif key == "sendLoadingState":
        if isinstance(value, bool):
            draft.reasoning = value
    elif key == "startPort":
        pass  # swapd picks a free loopback port per start (llama_server.port: auto)
    elif key == "logLevel":
        level = {"warn": "warning"}.get(str(value), str(value))
        draft.lose(key, f"set SWAPD_LOG_LEVEL={level} in swapd's environment instead")
    elif key == "apiKeys":
        _llama_swap_keys(value, draft)
    elif key == "groups":
        _llama_swap_groups(value, draft, key)
    elif key == "routing":
        _llama_swap_routing(value, draft)
    elif key == "selectors":
        _llama_swap_selectors(value, draft)
    elif key == "hooks":
        _llama_swap_hooks(value, draft)
    elif key == "peers":
        _llama_swap_peers(value, draft)
    elif key in _TOP_KEYS_LOST:
        draft.lose(key, _TOP_KEYS_LOST[key])
    else:
        draft.lose(key, "a setting this importer does not know (newer than it, or a "
                   "typo); left out")


def _llama_swap_keys(value: Any, draft: Draft) -> None:
    keys = value if isinstance(value, list) else []
    if not keys:
        return
    env_names = [m.group(1)[4:] for k in keys if isinstance(k, str)
                 and (m := re.fullmatch(r"\$\{(env\.[A-Za-z_][A-Za-z0-9_]*)\}", k.strip()))]
    if len(keys) == 1 and len(env_names) == 1:
        draft.api_key_env = env_names[0]
        return
    draft.api_key_env = "SWAPD_API_KEY"
    draft.lose("apiKeys", f"{len(keys)} key(s) not copied: swapd never reads keys from its "
               "config; put them in $SWAPD_API_KEY (commas between several) or in a file "
               "named by security.api_key_file. swapd then asks for a key on every "
               "endpoint but /health, not only on inference")


def _llama_swap_groups(value: Any, draft: Draft, where: str) -> None:
    """Groups say by hand which models may run together; swapd's budget decides that.

    ``persistent`` members become ``pinned``; ``swap: false`` and ``exclusive: false``
    ask for several models at once, which ``residency.mode: budget`` gives wherever they
    fit. What a group cannot say to swapd (a model that must never run beside another)
    is listed.
    """
    if not isinstance(value, Mapping):
        draft.lose(where, "not a mapping; left out")
        return
    for name, group in value.items():
        group = group if isinstance(group, Mapping) else {}
        members = _names(group.get("members"))
        listed = ", ".join(members) or "(none)"
        if group.get("persistent") is True:
            draft.pinned.update(members)
            draft.budget(f"group {name!s} is persistent: its members are pinned")
        if group.get("swap") is False or group.get("exclusive") is False:
            draft.budget(f"group {name!s} runs models together")
        if group.get("swap", True) is not False and len(members) > 1:
            draft.lose(f"{where}.{name}", f"members {listed} swapped with each other; swapd "
                       "keeps models loaded together wherever they fit the GPU budget "
                       "(residency.mode: budget) and evicts the least recently used idle "
                       "one when a new one does not fit")


def _llama_swap_routing(value: Any, draft: Draft) -> None:
    """``routing:`` (newer llama-swap): a router (``group`` or ``matrix``), a scheduler."""
    if not isinstance(value, Mapping):
        draft.lose("routing", "not a mapping; left out")
        return
    for key, body in value.items():
        where = f"routing.{key}"
        body = body if isinstance(body, Mapping) else {}
        if key == "router":
            settings = body.get("settings")
            settings = settings if isinstance(settings, Mapping) else {}
            if "groups" in settings:
                _llama_swap_groups(settings["groups"], draft, f"{where}.settings.groups")
            if "matrix" in settings:
                draft.lose(f"{where}.settings.matrix", _TOP_KEYS_LOST["matrix"])
            if not {"groups", "matrix"} & set(settings):
                draft.lose(where, f"use: {body.get('use', 'group')!s}: swapd has one way to "
                           "route, one model at a time; left out")
        elif key == "scheduler":
            draft.lose(where, f"use: {body.get('use', 'fifo')!s}: swapd serves waiting "
                       "requests model by model, oldest first, with a starvation bound "
                       "(queue.starvation_bound); left out")
        else:
            draft.lose(where, "a routing setting this importer does not know; left out")


def _llama_swap_selectors(value: Any, draft: Draft) -> None:
    """``selectors:`` (newer llama-swap): one name that picks one of several models."""
    if not isinstance(value, Mapping) or not value:
        draft.lose("selectors", "not a mapping of selectors; left out")
        return
    for name, body in value.items():
        body = body if isinstance(body, Mapping) else {}
        names = ", ".join(_names(body.get("targets"))) or "(none)"
        draft.lose(f"selectors.{name}", f"picks one of {names} (strategy "
                   f"{body.get('strategy', 'warm')!s}); swapd has no selectors: make "
                   f"{str(name)!r} an alias of one of those profiles instead")


def _llama_swap_hooks(value: Any, draft: Draft) -> None:
    hooks = value if isinstance(value, Mapping) else {}
    startup = hooks.get("on_startup")
    preload = _names(startup.get("preload")) if isinstance(startup, Mapping) else []
    if preload:
        draft.preload.update(preload)
        if len(preload) > 1:
            draft.budget(f"{len(preload)} models are preloaded")
    for key in hooks:
        if key != "on_startup" or not preload:
            draft.lose(f"hooks.{key}", "swapd has no hooks; left out")


def _llama_swap_peers(value: Any, draft: Draft) -> None:
    if not isinstance(value, Mapping):
        draft.lose("peers", "not a mapping; left out")
        return
    for peer, body in value.items():
        body = body if isinstance(body, Mapping) else {}
        proxy = str(body.get("proxy") or "")
        if not proxy.startswith(("http://", "https://")):
            draft.lose(f"peers.{peer}", f"proxy {proxy!r} is not an http(s) URL; left out")
            continue
        base_url = proxy.rstrip("/")
        if not base_url.endswith("/v1"):
            base_url += "/v1"  # llama-swap appends /v1/...; a fallback's base_url has it
        key = body.get("apiKey")
        key_env = None
        if isinstance(key, str) and (m := re.fullmatch(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}",
                                                       key.strip())):
            key_env = m.group(1)
        elif key:
            key_env = f"{_env_safe(str(peer))}_API_KEY"
            draft.lose(f"peers.{peer}.apiKey", f"not copied: put the key in ${key_env} "
                       "in swapd's environment (fallbacks read keys from there)")
        for model in _names(body.get("models")):
            fallback: dict[str, Any] = {"name": f"{peer}:{model}", "base_url": base_url,
                                        "model": str(model)}
            if key_env:
                fallback["api_key_env"] = key_env
            draft.fallbacks.append(fallback)
        draft.lose(f"peers.{peer}", "written as commented-out fallbacks: a client may ask "
                   "for a fallback by its model name, as with a peer, but swapd also sends "
                   "requests to fallbacks when a local model cannot start; uncomment them "
                   "if that is what you want")
    draft.fallback_note = ("llama-swap peers, as swapd fallbacks. Unlike peers, fallbacks "
                           "also serve requests for local models that fail to start.")


def _llama_swap_model(model_id: str, body: Any, macros: Mapping[str, str],
                      environ: Mapping[str, str], draft: Draft,
                      binaries: dict[str, str]) -> None:
    where = f"models.{model_id}"
    if not isinstance(body, Mapping):
        draft.leave_out(model_id, where, "not a mapping of settings")
        return
    raw = body.get("cmd")
    if not isinstance(raw, str):
        draft.leave_out(model_id, where, "no 'cmd'" if raw is None else
                        f"its cmd is not a command line (got {type(raw).__name__})")
        return
    local = {**macros, **_string_macros(body.get("macros"), f"{where}.macros", draft),
             "MODEL_ID": model_id}
    # llama-swap drops comment lines before it expands macros: '# ${llama} is ...' must
    # not turn into the command.
    cmd = _expand(_strip_comment_lines(raw), local, environ, f"{where}.cmd", draft)
    try:
        argv = shlex.split(_join_lines(cmd))
    except ValueError as error:
        draft.leave_out(model_id, f"{where}.cmd", f"its cmd cannot be split like a shell "
                        f"would ({error})", original=raw)
        return
    env, argv = _split_env_prefix(argv)
    if not argv:
        draft.leave_out(model_id, f"{where}.cmd", "its cmd is empty")
        return
    program = argv[0]
    base = re.split(r"[/\\]", program)[-1]
    if base.lower() in _CONTAINER_ENGINES:
        verb = f"{base} {argv[1]}" if len(argv) > 1 and not argv[1].startswith("-") else base
        draft.leave_out(model_id, where, f"cmd uses {verb} (a container)",
                        "swapd starts llama-server itself, as its own child: install "
                        "llama-server on the host, or serve the container elsewhere and add "
                        "it as a fallback", original=shlex.join(argv))
        return
    if not _LLAMA_SERVER.fullmatch(base):
        engine = _KNOWN_ENGINES.get(base.lower())
        why = f"not llama-server: program {base!r}" + (f" ({engine})" if engine else "")
        draft.leave_out(model_id, where, why, "swapd only runs llama-server: serve it "
                        "elsewhere and add it as a fallback, or use a GGUF of the model",
                        original=shlex.join(argv))
        return

    profile = _profile_from_args(model_id, argv[1:], where, draft, shlex.join(argv))
    if profile is None:
        return
    name = draft.claim(model_id, where, model=model_id)
    if name is None:
        return
    profile.name = name
    binaries[name] = program
    draft.outcomes.setdefault(model_id, "imported")

    for key in map(str, body):
        if key in _MODEL_KEYS_LOST:
            draft.lose(f"{where}.{key}", _model_key_lost(key, body[key]))
        elif key not in _MODEL_KEYS_HANDLED:
            draft.lose(f"{where}.{key}", "a model setting this importer does not know "
                       "(newer than it, or a typo); left out")
    text = {key: _expand(body[key], local, environ, f"{where}.{key}", draft)
            for key in _MODEL_TEXT_KEYS if isinstance(body.get(key), str)}
    for key in _MODEL_TEXT_KEYS:
        if body.get(key) is not None and key not in text:
            draft.lose(f"{where}.{key}", f"expected text, got {scalar(body[key])}; left out")
    profile.env.update(env)
    items = body.get("env")
    if items is not None and not isinstance(items, list):
        draft.lose(f"{where}.env", "expected a list of NAME=VALUE; left out")
    for item in items if isinstance(items, list) else []:
        var, eq, val = str(item).partition("=")
        if eq and re.fullmatch(cfg.ENV_NAME, var) and "${env." in val:
            # Often a secret (HF_TOKEN=${env.HF_TOKEN}): never copied into the file. The
            # child inherits swapd's environment, so it belongs there.
            draft.lose(f"{where}.env", f"{var} came from {val}: not copied (it may be a "
                       f"secret); the child inherits swapd's environment, so set {var} "
                       "there (systemd: /etc/swapd/swapd.env)")
        elif eq and re.fullmatch(cfg.ENV_NAME, var):
            profile.env[var] = _expand(val, local, environ, f"{where}.env", draft)
        else:
            draft.lose(f"{where}.env", f"{item!r} is not NAME=VALUE; left out")
    ttl = body.get("ttl")
    if isinstance(ttl, str):  # ttl: ${ttl}
        expanded = _expand(ttl, local, environ, f"{where}.ttl", draft).strip()
        ttl = float(expanded) if _NUMBERISH.fullmatch(expanded) else ttl
    if _is_number(ttl) and ttl >= 0:
        profile.ttl = float(ttl)
    elif ttl is not None and ttl != -1:
        draft.lose(f"{where}.ttl", f"expected seconds, got {ttl!r}; the global ttl applies")
    aliases = body.get("aliases")
    if aliases is not None and not isinstance(aliases, list):
        draft.lose(f"{where}.aliases", "expected a list of names; left out")
    for index, alias in enumerate(aliases if isinstance(aliases, list) else []):
        alias_id = alias.get("id") if isinstance(alias, Mapping) else alias
        if isinstance(alias_id, str):
            alias_id = _expand(alias_id, local, environ, f"{where}.aliases", draft)
            claimed = draft.claim(alias_id, f"{where}.aliases[{index}]")
            if claimed is not None:
                profile.aliases.append(claimed)
        else:
            draft.lose(f"{where}.aliases[{index}]", "not a name; left out")
    if text.get("name", "").strip():
        profile.display_name = text["name"]
    if text.get("description", "").strip():
        profile.description = text["description"]
    _check_proxy(text.get("proxy"), f"{where}.proxy", draft)
    endpoint = text.get("checkEndpoint")
    if endpoint not in (None, "", "/health"):
        draft.lose(f"{where}.checkEndpoint", f"{endpoint!r}: swapd always waits for "
                   "llama-server's /health")
    draft.profiles.append(profile)


def _model_key_lost(key: str, value: Any) -> str:
    """Why a model's ``key`` is not carried over, with what it did where that helps."""
    what = _MODEL_KEYS_LOST[key]
    if key == "filters" and isinstance(value, Mapping):
        stripped = value.get("stripParams", value.get("strip_params"))
        if isinstance(stripped, str) and stripped.strip():
            what = f"it removed {stripped.strip()!r} from requests; {what}"
    return what


def _check_proxy(proxy: Any, where: str, draft: Draft) -> None:
    if not isinstance(proxy, str) or not proxy.strip():
        return
    parts = urlsplit(proxy.strip())
    if parts.hostname in {h.strip("[]") for h in _LOCAL_HOSTS} and parts.path in ("", "/"):
        return  # the child on loopback: swapd picks its port and proxies to it itself
    draft.lose(where, f"{proxy!r}: swapd only proxies to the llama-server it starts on "
               "loopback; requests no longer go there")


def _names(value: Any) -> list[str]:
    """The names in a list of names (or one name); anything else has none."""
    items = value if isinstance(value, list) else [value] if isinstance(value, str) else []
    return [str(item) for item in items
            if isinstance(item, str | int | float) and not isinstance(item, bool)]


def _string_macros(value: Any, where: str, draft: Draft) -> dict[str, str]:
    """A ``macros`` mapping as text (numbers and true/false as llama-swap prints them)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        draft.lose(where, "not a mapping; macros left unexpanded")
        return {}
    macros: dict[str, str] = {}
    for name, macro in value.items():
        if isinstance(macro, str | int | float | bool):
            macros[str(name)] = _text(macro)
        else:
            draft.lose(f"{where}.{name}", f"expected text, a number or true/false, got "
                       f"{scalar(macro)}; ${{{name}}} left unexpanded")
    return macros


class _Unexpandable(Exception):
    """A macro that expands too far: nested too deep, or to too much text."""


def _expand(text: str, macros: Mapping[str, str], environ: Mapping[str, str], where: str,
            draft: Draft) -> str:
    """``text`` with ``${env.VAR}`` and ``${macro}`` replaced, macros within macros too.

    Each macro is expanded where it is used, so the model's macros and ``${MODEL_ID}``
    reach into global ones, and order of definition does not matter. What cannot be
    expanded stays as written and is listed: an unset variable, an unknown macro, macros
    that refer to each other in a circle, nesting deeper than :data:`_MAX_MACRO_DEPTH`,
    a result longer than :data:`_MAX_EXPANDED_CHARS`. ``${PORT}`` stays: the argv parser
    drops the ``--port`` it belongs to.
    """
    notes: list[str] = []
    done: dict[str, str] = {}  # macro -> its expansion, where no cycle was cut short
    cycles = [0]

    def note(what: str) -> None:
        if what not in notes:
            notes.append(what)

    def macro(name: str, stack: tuple[str, ...]) -> str:
        if name not in done:
            before = cycles[0]
            expanded = expand(macros[name], (*stack, name))
            if cycles[0] != before:
                return expanded  # depends on where it was used from
            done[name] = expanded
        return done[name]

    def expand(part: str, stack: tuple[str, ...]) -> str:
        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("env."):
                if name[4:] in environ:
                    return environ[name[4:]]
                note(f"${{{name}}}: the environment variable {name[4:]} is not set here; "
                     "left as is")
            elif name in stack:
                cycles[0] += 1
                cycle = " -> ".join((*stack[stack.index(name):], name))
                note(f"the macros {cycle} refer to each other in a circle; ${{{name}}} left "
                     "as is")
            elif name in macros:
                if not stack:  # a use in the text itself: report a runaway macro by name
                    try:
                        return macro(name, stack)
                    except _Unexpandable as error:
                        note(f"${{{name}}} {error}; left as is")
                        return match.group(0)
                if len(stack) >= _MAX_MACRO_DEPTH:
                    raise _Unexpandable(f"nests macros more than {_MAX_MACRO_DEPTH} deep")
                return macro(name, stack)
            elif name != "PORT":
                note(f"${{{name}}} is not a defined macro; left as is")
            return match.group(0)

        expanded = _MACRO.sub(one, part)
        if len(expanded) > _MAX_EXPANDED_CHARS:
            raise _Unexpandable(f"expands to more than {_MAX_EXPANDED_CHARS} characters")
        return expanded

    try:
        text = expand(text, ())
    except _Unexpandable as error:  # the text itself, with every macro used, is too long
        note(f"{error}; left unexpanded")
    for what in notes:
        draft.lose(where, what)
    return text


def _strip_comment_lines(cmd: str) -> str:
    """``cmd`` without its ``#`` comment lines, which llama-swap drops before expanding
    macros (and again after: a macro may bring some)."""
    return "\n".join(line for line in cmd.split("\n") if not line.strip().startswith("#"))


def _join_lines(cmd: str) -> str:
    """As llama-swap's ``SanitizeCommand``: comment lines dropped, and a line that ends in
    ``\\`` (after trailing blanks) goes on on the next line."""
    lines = []
    for line in _strip_comment_lines(cmd).split("\n"):
        trimmed = line.strip()
        lines.append(trimmed[:-1] + " " if trimmed.endswith("\\") else line)
    return "\n".join(lines)


def _split_env_prefix(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``env A=1 B=2 llama-server ...`` -> ({A: 1, B: 2}, [llama-server, ...])."""
    env: dict[str, str] = {}
    if argv and PurePosixPath(argv[0]).name == "env":
        rest = argv[1:]
        while rest and re.fullmatch(rf"{cfg.ENV_NAME.pattern}=.*", rest[0], re.S):
            var, _, val = rest.pop(0).partition("=")
            env[var] = val
        return env, rest
    return env, argv


def _profile_from_args(model_id: str, args: Iterable[str], where: str, draft: Draft,
                       original: str | None = None) -> DraftProfile | None:
    """The profile a llama-server argv (after the program) describes, or None (the model
    is left out, and its ``original`` command kept as a comment)."""
    model: str | None = None
    flags: dict[str, FlagValue] = {}
    spelled: dict[str, str] = {}  # canonical name -> key as written
    downloads: list[str] = []
    tokens = list(args)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not token.startswith("-") or _NUMBERISH.fullmatch(token):
            draft.lose(f"{where}.cmd", f"{token!r} follows no flag; left out")
            continue
        name, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        value: str | bool = True
        if eq:
            value = inline
        elif index < len(tokens) and (not tokens[index].startswith("-")
                                      or _NUMBERISH.fullmatch(tokens[index])):
            value = tokens[index]
            index += 1
        try:
            key = normalize_flag(name)
            canonical = canonical_flag(name)
        except ValueError:
            draft.lose(f"{where}.cmd", f"{token!r} is not a flag name; left out")
            continue
        if canonical == "model":
            if isinstance(value, str) and value.strip():
                model = value
            continue
        if canonical in ("host", "port"):
            continue  # swapd passes --host and --port itself
        if canonical in _DOWNLOADS:
            downloads.append(f"--{canonical}")
        if canonical in spelled and spelled[canonical] != key:
            draft.lose(f"{where}.cmd", f"{spelled[canonical]!r} and {name!r} set the same "
                       f"flag; kept the last, {name} {value if value is not True else ''}"
                       .rstrip())
            flags.pop(spelled[canonical])
        spelled[canonical] = key
        typed = _typed(value)
        if key in flags:  # repeated: llama-server takes each (--lora a --lora b)
            previous = flags[key]
            items = list(previous) if isinstance(previous, list) else [previous]
            if typed is True or any(isinstance(i, bool) for i in items):
                continue
            flags[key] = [*items, typed]  # type: ignore[list-item]
        else:
            flags[key] = typed
    if model is None:
        how = (f" (it downloads one with {', '.join(downloads)})" if downloads else "")
        draft.leave_out(model_id, where, f"no --model in its cmd{how}", "swapd needs a local "
                        "GGUF path: download the file and add a profile with 'model: PATH'",
                        original=original)
        return None
    if "${PORT}" in str(flags):
        draft.lose(f"{where}.cmd", "uses ${PORT} outside --port; swapd's port is only "
                   "known at start, so that flag is left as written")
    profile = DraftProfile(name=model_id, model=model, flags=flags, source=model_id)
    if not model.startswith(("/", "~")):
        profile.notes.append("relative model paths are relative to this file's directory")
        draft.lose(f"{where}.cmd", f"the model path {model!r} is relative: llama-swap "
                   "resolved it against its working directory, swapd resolves it "
                   "against the config file's directory; make it absolute")
    return profile


def _require_profiles(draft: Draft, source: str) -> None:
    """A config without profiles would not load: say why nothing could be imported."""
    if not draft.profiles:
        raise ConfigError(["no profile could be imported", *draft.unmapped], source=source)


def _choose_command(draft: Draft, binaries: Mapping[str, str]) -> None:
    """The most common llama-server program becomes ``llama_server.command``."""
    if not binaries:
        return
    counts = collections.Counter(binaries.values())
    program = counts.most_common(1)[0][0]  # ties: the first model's
    draft.command = [program]
    if len(counts) > 1:
        others = sorted(set(counts) - {program})
        draft.command_note = f"the most common of: {', '.join([program, *others])}"
        for name, used in binaries.items():
            if used != program:
                draft.lose(f"models.{name}.cmd", f"ran {used!r}; swapd runs one "
                           f"llama_server.command for every profile ({program!r}). "
                           "Flags this build does not know show up in 'swapd check'")
    if "/" in program and not program.startswith(("/", "~")):
        draft.lose("llama_server.command", f"{program!r} is a relative path: swapd "
                   "resolves it against its own working directory; make it absolute")


def _lift_common_env(draft: Draft) -> None:
    """Variables every profile sets to the same value move to ``llama_server.env``."""
    if len(draft.profiles) < 2:
        return
    first = draft.profiles[0].env
    common = {k: v for k, v in first.items()
              if all(p.env.get(k) == v for p in draft.profiles[1:])}
    for key, value in common.items():
        draft.env[key] = value
        for profile in draft.profiles:
            del profile.env[key]


# --- router + sidecar manifests ------------------------------------------------------

_PROFILE_KEYS = {"model", "display_name", "aliases", "ttl", "env", "description",
                 "keep_cache", "flags"}
_MODEL_KEY_SPELLINGS = ("model", "model_path", "path", "gguf", "file")
_ARGS_KEYS = ("args", "extra_args", "argv")
_COMMAND_KEYS = ("llama_server", "llama_server_bin", "server_bin", "binary", "command")


def import_manifest(text: str) -> Imported:
    """A swapd config from a router/sidecar ``manifest.yaml``, what was left out, and for
    each profile whether it was imported or why not.

    The manifest holds ``profiles:`` (or ``models:``), each ``NAME: {model, flags, ...}``.
    ``flags`` may be a mapping (as in swapd), a list of argv words or one command-line
    string; every other key that is not a swapd profile key is a llama-server flag
    (``ctx_size: 65536``, ``n_gpu_layers: 99``). ``model_path``/``path`` mean ``model``,
    ``name`` means ``display_name``, ``args`` adds argv words. At the top level, the
    program may be given as ``llama_server``/``binary``/``command``. Raises
    :class:`ConfigError` when ``text`` is not YAML or has no profiles mapping.
    """
    source = "manifest"
    data = cfg.read_yaml(text, source)
    key = next((k for k in ("profiles", "models") if isinstance(data, Mapping)
                and isinstance(data.get(k), Mapping)), None)
    if key is None or not isinstance(data, Mapping):
        raise ConfigError(["expected a manifest: a mapping with 'profiles:' of "
                           "NAME: {model, flags}"], source=source)
    draft = Draft(source="a router/sidecar manifest")
    for top, value in data.items():
        top = str(top)
        if top == key:
            continue
        if top in _COMMAND_KEYS and isinstance(value, str | list) and value:
            command = [str(v) for v in value] if isinstance(value, list) else [value]
            if command[0].strip():
                draft.command = command
            else:
                draft.lose(top, "names no program; llama_server.command stays llama-server")
        elif top in ("host", "port", "listen"):
            draft.lose(top, "the sidecar's own address; swapd listens on 'listen' (below) "
                       "and picks the llama-server port itself")
        elif top in ("default", "default_profile"):
            draft.lose(top, f"swapd loads a model on its first request; to preload "
                       f"{value!r}, run 'swapd load {value}' once swapd is up")
        else:
            draft.lose(top, "not a manifest setting swapd knows; left out")
    for name, body in data[key].items():
        _manifest_profile(str(name), body, f"{key}.{name}", draft)
    _lift_common_env(draft)
    if not draft.profiles and any(isinstance(body, Mapping) and "cmd" in body
                                  for body in data[key].values()):
        raise ConfigError(["this looks like a llama-swap config (its models have 'cmd'); "
                           "import it with 'swapd import llama-swap'"], source=source)
    _require_profiles(draft, source)
    return Imported(render(draft), draft.unmapped, draft.outcomes)


def _manifest_profile(name: str, body: Any, where: str, draft: Draft) -> None:
    if isinstance(body, str):
        body = {"model": body}
    if not isinstance(body, Mapping):
        draft.leave_out(name, where, "not a mapping with 'model'")
        return
    model_key = next((k for k in _MODEL_KEY_SPELLINGS
                      if isinstance(body.get(k), str) and body[k].strip()), None)
    if model_key is None:
        draft.leave_out(name, where, "no model path ('model:')", original=scalar(dict(body)))
        return
    args: list[str] = []
    flags: dict[str, FlagValue] = {}
    raw_flags = body.get("flags")
    if isinstance(raw_flags, str):
        args += _shell_words(raw_flags, f"{where}.flags", draft)
    elif isinstance(raw_flags, list):
        args += [_text(v) for v in raw_flags]
    elif isinstance(raw_flags, Mapping):
        for key, value in raw_flags.items():
            _manifest_flag(str(key), value, f"{where}.flags", flags, draft)
    elif raw_flags is not None:
        draft.lose(f"{where}.flags", "expected a mapping, a list or a command line; left out")
    for key in _ARGS_KEYS:
        value = body.get(key)
        if isinstance(value, str):
            args += _shell_words(value, f"{where}.{key}", draft)
        elif isinstance(value, list):
            args += [_text(v) for v in value]
    for key, value in body.items():
        key = str(key)
        if key in _PROFILE_KEYS or key in _ARGS_KEYS or key == model_key or key == "name":
            continue
        _manifest_flag(key, value, where, flags, draft)
    # --model=PATH: a path that starts with '-' is still the value
    parsed = _profile_from_args(name, [f"--model={body[model_key]}", *args], where, draft)
    assert parsed is not None  # --model is there
    claimed = draft.claim(name, where, model=name)
    if claimed is None:
        return
    draft.outcomes.setdefault(name, "imported")
    profile = DraftProfile(name=claimed, model=body[model_key], flags={**flags, **parsed.flags},
                       notes=parsed.notes)
    display = body.get("display_name", body.get("name"))
    if isinstance(display, str) and display != name:
        profile.display_name = display
    if isinstance(body.get("description"), str):
        profile.description = body["description"]
    aliases = body.get("aliases")
    if aliases is not None and not isinstance(aliases, str | list):
        draft.lose(f"{where}.aliases", "expected a list of names; left out")
    for index, alias in enumerate(_names(aliases)):
        claimed_alias = draft.claim(alias, f"{where}.aliases[{index}]")
        if claimed_alias is not None:
            profile.aliases.append(claimed_alias)
    ttl = body.get("ttl")
    if ttl is not None:
        try:
            profile.ttl = cfg.parse_duration(ttl)
        except ValueError as error:
            draft.lose(f"{where}.ttl", f"{error}; the global ttl applies")
    env = body.get("env")
    if isinstance(env, Mapping):
        for var, val in env.items():
            if re.fullmatch(cfg.ENV_NAME, str(var)) and not isinstance(val, Mapping | list):
                profile.env[str(var)] = _text(val)
            else:
                draft.lose(f"{where}.env.{var}", "not NAME: VALUE; left out")
    elif env is not None:
        draft.lose(f"{where}.env", "expected a mapping; left out")
    if isinstance(body.get("keep_cache"), bool):
        profile.keep_cache = body["keep_cache"]
    profile.flags = _one_spelling(profile.flags, where, draft)
    draft.profiles.append(profile)


def _shell_words(text: str, where: str, draft: Draft) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as error:
        draft.lose(where, f"cannot be split like a shell would ({error}); left out")
        return []


def _one_spelling(flags: Mapping[str, FlagValue], where: str,
                  draft: Draft) -> dict[str, FlagValue]:
    """``flags`` with one key per flag: the last of two spellings (``c``, ``ctx_size``)."""
    kept: dict[str, tuple[str, FlagValue]] = {}
    for key, value in flags.items():
        canonical = canonical_flag(key)
        if canonical in kept and kept[canonical][0] != key:
            first, before = kept[canonical]
            draft.lose(where, f"{first}: {scalar(before)} and {key}: {scalar(value)} set "
                       f"the same flag (--{canonical}); kept {key}: {scalar(value)}")
        kept[canonical] = (key, value)
    return dict(kept.values())


def _manifest_flag(key: str, value: Any, where: str, flags: dict[str, FlagValue],
                   draft: Draft) -> None:
    try:
        canonical = canonical_flag(key)
        name = normalize_flag(key)
    except ValueError:
        draft.lose(f"{where}.{key}", "neither a profile setting nor a flag name; left out")
        return
    if canonical in ("host", "port", "model"):
        draft.lose(f"{where}.{key}", "swapd sets this itself; left out")
        return
    if value is None or isinstance(value, str | int | float):  # bool is an int
        flags[name] = value
    elif isinstance(value, list) and all(isinstance(v, str | int | float)
                                         and not isinstance(v, bool) for v in value):
        flags[name] = list(value)
    else:
        draft.lose(f"{where}.{key}", f"a flag value must be text, a number, true/false or a "
                   f"list, got {type(value).__name__}; left out")


# --- the command line ------------------------------------------------------------------

def run_import(kind: str, source: str | os.PathLike[str], output: str | os.PathLike[str] | None,
               *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``swapd import KIND SOURCE [-o OUTPUT]``: convert, write, list what was left out.

    ``kind`` is a key of :data:`IMPORTERS` (``llama-swap``, ``manifest``). The config goes
    to ``output`` (refusing to overwrite an existing file) or to ``out`` (stdout); what
    could not be carried over goes to ``err`` (stderr), one line each. Returns the exit
    status: 0 converted (even with items left out: they are listed, and written into the
    config as comments), 1 the source could not be read or converted, 2 usage.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    importer = IMPORTERS.get(kind)
    if importer is None:
        print(f"swapd import: unknown kind {kind!r}; one of: {', '.join(IMPORTERS)}", file=err)
        return 2
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        print(f"swapd import: cannot read {path}: {error}", file=err)
        return 1
    try:
        config, unmapped, models = importer(text)
    except ConfigError as error:
        print(str(error).replace(error.source, str(path), 1), file=err)
        return 1
    if output is None:
        out.write(config if config.endswith("\n") else config + "\n")
    else:
        target = Path(output)
        try:
            with target.open("x", encoding="utf-8") as file:
                file.write(config)
        except FileExistsError:
            print(f"swapd import: {target} exists; not overwritten", file=err)
            return 1
        except OSError as error:
            print(f"swapd import: cannot write {target}: {error.strerror or error}", file=err)
            return 1
    written = "the output" if output is None else str(output)
    imported = sum(why.startswith("imported") for why in models.values())
    print(f"{path}: {imported} of {len(models)} model(s) imported:", file=err)
    for model, why in models.items():
        print(f"  - {one_line(model)}: {'' if why.startswith('imported') else 'not imported: '}"
              f"{one_line(why)}", file=err)
    if unmapped:
        print(f"{path}: {len(unmapped)} thing(s) not carried over (also listed at the top of "
              f"{written}):", file=err)
        for item in unmapped:
            print(f"  - {item}", file=err)
    target_name = "CONFIG" if output is None else str(output)
    print(f"next: review it, then run 'swapd check {target_name}'", file=err)
    return 0


def _typed(value: str | bool) -> FlagValue:
    """argv text as the YAML value that gives the same text back (``4096`` -> 4096)."""
    if isinstance(value, bool):
        return value
    if _INTEGER.fullmatch(value):
        return int(value)
    if _DECIMAL.fullmatch(value) and format_value(float(value)) == value:
        return float(value)
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return format_value(value)
    return str(value)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _env_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).upper().strip("_") or "FALLBACK"


IMPORTERS: Mapping[str, Callable[[str], Imported]] = cfg.FrozenDict({
    "llama-swap": import_llama_swap,
    "manifest": import_manifest,
})
"""The formats ``swapd import`` reads, by the name the command line uses."""
