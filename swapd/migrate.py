"""Import configs of the tools swapd replaces: llama-swap, and router + sidecar manifests.

Both importers return a commented swapd YAML config plus the list of what could not be
carried over, each item naming where it was and what to do instead. The config they
write always loads (:func:`swapd.config.parse_config`), and every profile's argv builds
(:func:`swapd.flags.build_argv`); what they cannot express is left out and listed, never
guessed. ``swapd check`` is the next step: it checks flag names against the real
``llama-server --help`` and that the model files exist.

:func:`import_llama_swap` reads llama-swap's format: ``models`` with a ``cmd`` command
line (``${macros}``, ``${PORT}``, ``${MODEL_ID}``, ``${env.VAR}``), ``ttl``, ``aliases``,
``env``, ``name``, ``description``; the top-level ``macros``, ``healthCheckTimeout``,
``globalTTL``, ``sendLoadingState``, ``apiKeys``, ``groups``, ``matrix``, ``hooks`` and
``peers``. Each ``cmd`` is split like a shell would (``shlex``) after macros are
expanded: the program becomes ``llama_server.command``, ``--model``/``-m`` the profile's
``model``, ``--port``/``--host`` are dropped (swapd owns them) and every other option
becomes a ``flags`` entry (``true`` for a bare flag, a list for a repeated one).

:func:`import_manifest` reads the manifest of a "router on one box, sidecar on the GPU
host" setup: ``profiles:`` (or ``models:``) of ``{model, flags}`` where any other key is
a llama-server flag (``ctx_size: 65536``). ``docs/migration.md`` describes both formats.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TextIO, TypeGuard
from urllib.parse import urlsplit

import attrs
import yaml

from swapd import config as cfg
from swapd.errors import ConfigError
from swapd.flags import FlagValue, canonical_flag, format_value, normalize_flag

__all__ = ["IMPORTERS", "import_llama_swap", "import_manifest", "run_import"]

LLAMA_SWAP_LISTEN = ":8080"
"""llama-swap's default listen address (its ``--listen`` flag), for the output's comment."""

_MACRO = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_DECIMAL = re.compile(r"-?[0-9]+\.[0-9]+")
_NUMBERISH = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_LLAMA_SERVER = re.compile(r"(?:llama[-_]server|server)(?:[-_.][A-Za-z0-9_.-]*)?(?:\.exe)?",
                           re.IGNORECASE)
_DOWNLOADS = ("hf-repo", "hf-file", "model-url", "docker-repo")
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0")
_MAX_MACRO_DEPTH = 16
_KNOWN_ENGINES = {
    "vllm": "vLLM", "python": "a Python program", "python3": "a Python program",
    "docker": "a container (docker)", "podman": "a container (podman)",
    "sglang": "SGLang", "koboldcpp": "KoboldCpp", "tabbyapi": "TabbyAPI",
    "ollama": "Ollama", "whisper-server": "whisper.cpp's server",
    "sd-server": "stable-diffusion.cpp's server",
}


@attrs.define
class _Profile:
    """One profile being built; ``notes`` become comments above it."""

    name: str
    model: str
    flags: dict[str, FlagValue] = attrs.field(factory=dict)
    aliases: list[str] = attrs.field(factory=list)
    env: dict[str, str] = attrs.field(factory=dict)
    ttl: Any = None  # seconds (float) or duration text, as the source gave it
    display_name: str | None = None
    description: str | None = None
    keep_cache: bool | None = None
    notes: list[str] = attrs.field(factory=list)


@attrs.define
class _Draft:
    """The swapd config being assembled, and what could not be carried over."""

    source: str
    command: list[str] | None = None
    command_note: str | None = None
    env: dict[str, str] = attrs.field(factory=dict)
    start_timeout: float | None = None
    ttl: float | None = None
    reasoning: bool | None = None
    reasoning_note: str | None = None
    api_key_env: str | None = None
    profiles: list[_Profile] = attrs.field(factory=list)
    skipped: list[tuple[str, str, str]] = attrs.field(factory=list)  # name, why, original
    fallbacks: list[dict[str, Any]] = attrs.field(factory=list)
    fallback_note: str | None = None
    unmapped: list[str] = attrs.field(factory=list)
    names: set[str] = attrs.field(factory=set)

    def lose(self, where: str, what: str) -> None:
        self.unmapped.append(f"{where}: {what}")

    def claim(self, name: str, where: str) -> str | None:
        """A valid, unused swapd name for ``name`` (sanitised), or None (and why)."""
        clean = re.sub(r"[^A-Za-z0-9._:/@+-]+", "-", name.strip()).strip("-")
        if not clean:
            self.lose(where, f"{name!r} cannot be a swapd name; left out")
            return None
        if clean != name:
            self.lose(where, f"{name!r} is not a valid swapd name (letters, digits and "
                      f". _ : / @ + - only); clients must now ask for {clean!r}")
        if clean in self.names:
            self.lose(where, f"the name {clean!r} is already taken; left out")
            return None
        self.names.add(clean)
        return clean


# --- llama-swap ----------------------------------------------------------------------

_MODEL_KEYS_HANDLED = {"cmd", "macros", "ttl", "aliases", "env", "name", "description",
                       "proxy", "checkEndpoint"}

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
}


def import_llama_swap(text: str, *,
                      environ: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """A swapd config (commented YAML) from llama-swap config ``text``, and what could not
    be carried over (one line each, ``where: what and what to do``).

    ``${env.VAR}`` macros are read from ``environ`` (default: ``os.environ``); a variable
    that is not set stays in the text and is listed. Raises :class:`ConfigError` when
    ``text`` is not YAML or has no ``models`` mapping.
    """
    source = "llama-swap config"
    data = cfg._read_yaml(text, source)
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), Mapping):
        raise ConfigError(["expected a llama-swap config: a mapping with 'models:'"],
                          source=source)
    env = os.environ if environ is None else environ
    draft = _Draft(source="llama-swap")
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
    return _render(draft), draft.unmapped


def _llama_swap_top(key: str, value: Any, draft: _Draft) -> None:
    if key in ("models", "macros"):
        return
    if key == "healthCheckTimeout":
        if _is_number(value) and value > 0:
            draft.start_timeout = max(float(value), 15.0)  # llama-swap's own minimum
        else:
            draft.lose(key, f"expected seconds, got {value!r}; timeouts.start left at "
                       "its default (120s)")
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
        _llama_swap_groups(value, draft)
    elif key == "matrix":
        draft.lose(key, "swapd runs one model at a time; sets of models that run "
                   "together are not possible, every profile swaps with every other")
    elif key == "hooks":
        _llama_swap_hooks(value, draft)
    elif key == "peers":
        _llama_swap_peers(value, draft)
    elif key in _TOP_KEYS_LOST:
        draft.lose(key, _TOP_KEYS_LOST[key])
    else:
        draft.lose(key, "not a llama-swap setting swapd knows; left out")


def _llama_swap_keys(value: Any, draft: _Draft) -> None:
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


def _llama_swap_groups(value: Any, draft: _Draft) -> None:
    if not isinstance(value, Mapping):
        draft.lose("groups", "not a mapping; left out")
        return
    for name, group in value.items():
        group = group if isinstance(group, Mapping) else {}
        members = [str(m) for m in group.get("members") or []]
        what = [f"swapd runs one model at a time: members {', '.join(members) or '(none)'} "
                "swap with each other and with every other profile"]
        if group.get("swap") is False:
            what.append("swap: false (members running together) is not possible")
        if group.get("exclusive") is False:
            what.append("exclusive: false (leaving other groups running) is not possible")
        if group.get("persistent") is True:
            what.append("persistent: true is not kept (a ttl of 0 keeps a model until "
                        "another one is asked for)")
        draft.lose(f"groups.{name}", "; ".join(what))


def _llama_swap_hooks(value: Any, draft: _Draft) -> None:
    hooks = value if isinstance(value, Mapping) else {}
    startup = hooks.get("on_startup")
    preload = startup.get("preload") if isinstance(startup, Mapping) else None
    if preload:
        names = ", ".join(str(p) for p in preload)
        draft.lose("hooks.on_startup.preload", f"swapd loads a model on its first request; "
                   f"to preload ({names}), run 'swapd load NAME' or POST /swapd/load "
                   "{\"model\": NAME} once swapd is up (ExecStartPost= in a systemd "
                   "drop-in); only one model can be loaded")
    for key in hooks:
        if key != "on_startup" or not preload:
            draft.lose(f"hooks.{key}", "swapd has no hooks; left out")


def _llama_swap_peers(value: Any, draft: _Draft) -> None:
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
        for model in body.get("models") or []:
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
                      environ: Mapping[str, str], draft: _Draft,
                      binaries: dict[str, str]) -> None:
    where = f"models.{model_id}"
    if not isinstance(body, Mapping) or not isinstance(body.get("cmd"), str):
        draft.lose(where, "has no 'cmd'; left out")
        return
    local = {**macros, **_string_macros(body.get("macros"), f"{where}.macros", draft),
             "MODEL_ID": model_id}
    cmd = _expand(body["cmd"], local, environ, f"{where}.cmd", draft)
    try:
        argv = shlex.split(_strip_comment_lines(cmd))
    except ValueError as error:
        draft.skipped.append((model_id, f"its cmd cannot be split: {error}", body["cmd"]))
        draft.lose(f"{where}.cmd", f"cannot be split like a shell would ({error}); left out")
        return
    env, argv = _split_env_prefix(argv)
    if not argv:
        draft.lose(f"{where}.cmd", "is empty; left out")
        return
    program = argv[0]
    if not _LLAMA_SERVER.fullmatch(PurePosixPath(program).name):
        engine = _KNOWN_ENGINES.get(PurePosixPath(program).name.lower(), f"{program!r}")
        why = f"runs {engine} ('{PurePosixPath(program).name}'), not llama-server"
        draft.skipped.append((model_id, why, shlex.join(argv)))
        draft.lose(where, f"{why}; swapd only runs llama-server. Left out: serve it "
                   "elsewhere and add it as a fallback, or use a GGUF of the model")
        return

    profile = _profile_from_args(model_id, argv[1:], where, draft)
    if profile is None:
        draft.skipped.append((model_id, "no local model file",
                              shlex.join(argv)))
        return
    name = draft.claim(model_id, where)
    if name is None:
        return
    profile.name = name
    binaries[name] = program

    for key in map(str, body):
        if key in _MODEL_KEYS_LOST:
            draft.lose(f"{where}.{key}", _MODEL_KEYS_LOST[key])
        elif key not in _MODEL_KEYS_HANDLED:
            draft.lose(f"{where}.{key}", "not a llama-swap setting swapd knows; left out")
    profile.env.update(env)
    for item in body.get("env") or []:
        var, eq, val = str(item).partition("=")
        if eq and re.fullmatch(cfg._ENV_NAME, var) and "${env." in val:
            # Often a secret (HF_TOKEN=${env.HF_TOKEN}): never copied into the file. The
            # child inherits swapd's environment, so it belongs there.
            draft.lose(f"{where}.env", f"{var} came from {val}: not copied (it may be a "
                       f"secret); the child inherits swapd's environment, so set {var} "
                       "there (systemd: /etc/swapd/swapd.env)")
        elif eq and re.fullmatch(cfg._ENV_NAME, var):
            profile.env[var] = _expand(val, local, environ, f"{where}.env", draft)
        else:
            draft.lose(f"{where}.env", f"{item!r} is not NAME=VALUE; left out")
    ttl = body.get("ttl")
    if _is_number(ttl) and ttl >= 0:
        profile.ttl = float(ttl)
    elif ttl is not None and ttl != -1:
        draft.lose(f"{where}.ttl", f"expected seconds, got {ttl!r}; the global ttl applies")
    for index, alias in enumerate(body.get("aliases") or []):
        alias_id = alias.get("id") if isinstance(alias, Mapping) else alias
        if isinstance(alias_id, str):
            claimed = draft.claim(alias_id, f"{where}.aliases[{index}]")
            if claimed is not None:
                profile.aliases.append(claimed)
    if isinstance(body.get("name"), str) and body["name"].strip():
        profile.display_name = body["name"]
    if isinstance(body.get("description"), str) and body["description"].strip():
        profile.description = body["description"]
    _check_proxy(body.get("proxy"), f"{where}.proxy", draft)
    endpoint = body.get("checkEndpoint")
    if endpoint not in (None, "", "/health"):
        draft.lose(f"{where}.checkEndpoint", f"{endpoint!r}: swapd always waits for "
                   "llama-server's /health")
    draft.profiles.append(profile)


def _check_proxy(proxy: Any, where: str, draft: _Draft) -> None:
    if not isinstance(proxy, str) or not proxy.strip():
        return
    parts = urlsplit(proxy.strip())
    if parts.hostname in {h.strip("[]") for h in _LOCAL_HOSTS} and parts.path in ("", "/"):
        return  # the child on loopback: swapd picks its port and proxies to it itself
    draft.lose(where, f"{proxy!r}: swapd only proxies to the llama-server it starts on "
               "loopback; requests no longer go there")


def _string_macros(value: Any, where: str, draft: _Draft) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        draft.lose(where, "not a mapping; macros left unexpanded")
        return {}
    return {str(k): _text(v) for k, v in value.items()}


def _expand(text: str, macros: Mapping[str, str], environ: Mapping[str, str], where: str,
            draft: _Draft) -> str:
    """``text`` with ``${env.VAR}`` and ``${macro}`` replaced, macros within macros too.

    ``${PORT}`` stays: the argv parser drops the ``--port`` it belongs to.
    """
    missing: list[str] = []

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("env."):
            if name[4:] in environ:
                return environ[name[4:]]
        elif name in macros:
            return macros[name]
        elif name == "PORT":
            return match.group(0)
        if name not in missing:
            missing.append(name)
        return match.group(0)

    for _ in range(_MAX_MACRO_DEPTH):
        expanded = _MACRO.sub(one, text)
        if expanded == text:
            break
        text = expanded
    for name in missing:
        what = (f"${{{name}}}: the environment variable {name[4:]} is not set here; left "
                "as is" if name.startswith("env.") else f"${{{name}}} is not a defined "
                "macro; left as is")
        draft.lose(where, what)
    return text


def _strip_comment_lines(cmd: str) -> str:
    """llama-swap drops ``#`` comment lines of a ``cmd``; ``\\`` continues a line."""
    lines = [line for line in cmd.splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).replace("\\\n", " ")


def _split_env_prefix(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``env A=1 B=2 llama-server ...`` -> ({A: 1, B: 2}, [llama-server, ...])."""
    env: dict[str, str] = {}
    if argv and PurePosixPath(argv[0]).name == "env":
        rest = argv[1:]
        while rest and re.fullmatch(rf"{cfg._ENV_NAME.pattern}=.*", rest[0], re.S):
            var, _, val = rest.pop(0).partition("=")
            env[var] = val
        return env, rest
    return env, argv


def _profile_from_args(model_id: str, args: Iterable[str], where: str,
                       draft: _Draft) -> _Profile | None:
    """The profile a llama-server argv (after the program) describes, or None."""
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
            if isinstance(value, str):
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
        draft.lose(where, f"no --model in its cmd{how}: swapd needs a local GGUF path; "
                   "download the file and add a profile with 'model: PATH'")
        return None
    if "${PORT}" in str(flags):
        draft.lose(f"{where}.cmd", "uses ${PORT} outside --port; swapd's port is only "
                   "known at start, so that flag is left as written")
    profile = _Profile(name=model_id, model=model, flags=flags)
    if not model.startswith(("/", "~")):
        profile.notes.append("relative model paths are relative to this file's directory")
        draft.lose(f"{where}.cmd", f"the model path {model!r} is relative: llama-swap "
                   "resolved it against its working directory, swapd resolves it "
                   "against the config file's directory; make it absolute")
    return profile


def _require_profiles(draft: _Draft, source: str) -> None:
    """A config without profiles would not load: say why nothing could be imported."""
    if not draft.profiles:
        raise ConfigError(["no profile could be imported", *draft.unmapped], source=source)


def _choose_command(draft: _Draft, binaries: Mapping[str, str]) -> None:
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


def _lift_common_env(draft: _Draft) -> None:
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


def import_manifest(text: str) -> tuple[str, list[str]]:
    """A swapd config from a router/sidecar ``manifest.yaml``, and what was left out.

    The manifest holds ``profiles:`` (or ``models:``), each ``NAME: {model, flags, ...}``.
    ``flags`` may be a mapping (as in swapd), a list of argv words or one command-line
    string; every other key that is not a swapd profile key is a llama-server flag
    (``ctx_size: 65536``, ``n_gpu_layers: 99``). ``model_path``/``path`` mean ``model``,
    ``name`` means ``display_name``, ``args`` adds argv words. At the top level, the
    program may be given as ``llama_server``/``binary``/``command``. Raises
    :class:`ConfigError` when ``text`` is not YAML or has no profiles mapping.
    """
    source = "manifest"
    data = cfg._read_yaml(text, source)
    key = next((k for k in ("profiles", "models") if isinstance(data, Mapping)
                and isinstance(data.get(k), Mapping)), None)
    if key is None or not isinstance(data, Mapping):
        raise ConfigError(["expected a manifest: a mapping with 'profiles:' of "
                           "NAME: {model, flags}"], source=source)
    draft = _Draft(source="a router/sidecar manifest")
    for top, value in data.items():
        top = str(top)
        if top == key:
            continue
        if top in _COMMAND_KEYS and isinstance(value, str | list) and value:
            draft.command = [str(v) for v in value] if isinstance(value, list) else [value]
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
    return _render(draft), draft.unmapped


def _manifest_profile(name: str, body: Any, where: str, draft: _Draft) -> None:
    if isinstance(body, str):
        body = {"model": body}
    if not isinstance(body, Mapping):
        draft.lose(where, "expected a mapping with 'model'; left out")
        return
    model_key = next((k for k in _MODEL_KEY_SPELLINGS if isinstance(body.get(k), str)), None)
    if model_key is None:
        draft.lose(where, "has no model path ('model:'); left out")
        draft.skipped.append((name, "no model path", _scalar(dict(body))))
        return
    args: list[str] = []
    flags: dict[str, FlagValue] = {}
    raw_flags = body.get("flags")
    if isinstance(raw_flags, str):
        args += shlex.split(raw_flags)
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
            args += shlex.split(value)
        elif isinstance(value, list):
            args += [_text(v) for v in value]
    for key, value in body.items():
        key = str(key)
        if key in _PROFILE_KEYS or key in _ARGS_KEYS or key == model_key or key == "name":
            continue
        _manifest_flag(key, value, where, flags, draft)
    parsed = _profile_from_args(name, ["--model", body[model_key], *args], where, draft)
    assert parsed is not None  # --model is there
    claimed = draft.claim(name, where)
    if claimed is None:
        return
    profile = _Profile(name=claimed, model=body[model_key], flags={**flags, **parsed.flags},
                       notes=parsed.notes)
    display = body.get("display_name", body.get("name"))
    if isinstance(display, str) and display != name:
        profile.display_name = display
    if isinstance(body.get("description"), str):
        profile.description = body["description"]
    aliases = body.get("aliases")
    for index, alias in enumerate([aliases] if isinstance(aliases, str) else aliases or []):
        claimed_alias = draft.claim(str(alias), f"{where}.aliases[{index}]")
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
            if re.fullmatch(cfg._ENV_NAME, str(var)) and not isinstance(val, Mapping | list):
                profile.env[str(var)] = _text(val)
            else:
                draft.lose(f"{where}.env.{var}", "not NAME: VALUE; left out")
    elif env is not None:
        draft.lose(f"{where}.env", "expected a mapping; left out")
    if isinstance(body.get("keep_cache"), bool):
        profile.keep_cache = body["keep_cache"]
    profile.flags = _one_spelling(profile.flags, where, draft)
    draft.profiles.append(profile)


def _one_spelling(flags: Mapping[str, FlagValue], where: str,
                  draft: _Draft) -> dict[str, FlagValue]:
    """``flags`` with one key per flag: the last of two spellings (``c``, ``ctx_size``)."""
    kept: dict[str, tuple[str, FlagValue]] = {}
    for key, value in flags.items():
        canonical = canonical_flag(key)
        if canonical in kept and kept[canonical][0] != key:
            first, before = kept[canonical]
            draft.lose(where, f"{first}: {_scalar(before)} and {key}: {_scalar(value)} set "
                       f"the same flag (--{canonical}); kept {key}: {_scalar(value)}")
        kept[canonical] = (key, value)
    return dict(kept.values())


def _manifest_flag(key: str, value: Any, where: str, flags: dict[str, FlagValue],
                   draft: _Draft) -> None:
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
        config, unmapped = importer(text)
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
    if unmapped:
        print(f"{path}: {len(unmapped)} thing(s) not carried over (also listed at the top of "
              f"{written}):", file=err)
        for item in unmapped:
            print(f"  - {item}", file=err)
    target_name = "CONFIG" if output is None else str(output)
    print(f"next: review it, then run 'swapd check {target_name}'", file=err)
    return 0


# --- output --------------------------------------------------------------------------

def _render(draft: _Draft) -> str:
    out: list[str] = [
        f"# swapd configuration imported from {draft.source}.",
        "# Review it, then check flags against your llama-server and the model files:",
        "#     swapd check THIS_FILE",
        "# Every key is described in docs/configuration.md; the import in docs/migration.md.",
    ]
    if draft.unmapped:
        out.append(f"#\n# Not carried over ({len(draft.unmapped)}):")
        out += [f"#   - {item}" for item in draft.unmapped]
    listen_note = (f"llama-swap's default was {LLAMA_SWAP_LISTEN}; " if draft.source ==
                   "llama-swap" else "clients now come here instead of to the router; ")
    out += ["", f"listen: 127.0.0.1:9001  # {listen_note}0.0.0.0:9001 serves the LAN"]
    if draft.command is not None or draft.env:
        out.append("llama_server:")
        if draft.command is not None:
            command = draft.command[0] if len(draft.command) == 1 else draft.command
            note = f"  # {draft.command_note}" if draft.command_note else ""
            out.append(f"  command: {_scalar(command)}{note}")
        if draft.env:
            out.append("  env:  # set by every model before; now for every profile")
            out += [f"    {_scalar(k)}: {_scalar(v)}" for k, v in draft.env.items()]
    if draft.start_timeout is not None:
        out += ["timeouts:", f"  start: {_duration(draft.start_timeout)}  # healthCheckTimeout"]
    if draft.ttl is not None:
        out.append(f"ttl: {_duration(draft.ttl)}  # globalTTL; 0 = never unload")
    if draft.reasoning is not None or draft.reasoning_note:
        value = True if draft.reasoning is None else draft.reasoning
        note = draft.reasoning_note or "sendLoadingState"
        out += ["progress:", f"  reasoning: {_scalar(value)}  # {note}"]
    if draft.api_key_env is not None:
        out += ["security:", f"  api_key_env: {draft.api_key_env}  # the key(s) clients "
                "send; set this variable in swapd's environment"]
    out += ["", "profiles:"]
    for profile in draft.profiles:
        out += _render_profile(profile)
    for name, why, original in draft.skipped:
        out.append(f"  # not imported: {name} ({why})")
        out += [f"  #   {line}" for line in original.strip().splitlines()]
    if draft.fallbacks:
        block = yaml.safe_dump({"fallbacks": draft.fallbacks}, sort_keys=False,
                               default_flow_style=False, allow_unicode=True, width=math.inf)
        out += ["", f"# {draft.fallback_note}", *[f"# {line}" for line in block.splitlines()]]
    return "\n".join(out) + "\n"


def _render_profile(profile: _Profile) -> list[str]:
    out = [f"  {_scalar(profile.name)}:"]
    out += [f"    # {note}" for note in profile.notes]
    out.append(f"    model: {_scalar(profile.model)}")
    if profile.display_name is not None:
        out.append(f"    display_name: {_scalar(profile.display_name)}")
    if profile.description is not None:
        out.append(f"    description: {_scalar(profile.description)}")
    if profile.aliases:
        out.append(f"    aliases: {_scalar(profile.aliases)}")
    if profile.ttl is not None:
        out.append(f"    ttl: {_duration(profile.ttl)}")
    if profile.keep_cache is not None:
        out.append(f"    keep_cache: {_scalar(profile.keep_cache)}")
    if profile.env:
        out.append("    env:")
        out += [f"      {_scalar(k)}: {_scalar(v)}" for k, v in profile.env.items()]
    if profile.flags:
        out.append("    flags:")
        out += [f"      {_scalar(k)}: {_scalar(v)}" for k, v in profile.flags.items()]
    return out


def _scalar(value: Any) -> str:
    """One YAML value on one line (flow style), quoted wherever YAML would misread it."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=math.inf,
                          sort_keys=False)
    text = text.removesuffix("\n").removesuffix("\n...").strip()
    if yaml.load(text, Loader=cfg._StrictLoader) != value:  # '1e6' is a number to swapd
        text = json.dumps(value, ensure_ascii=False)  # JSON is YAML, every string quoted
    return text


def _duration(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if seconds.is_integer():
        whole = int(seconds)
        for unit, size in (("h", 3600), ("m", 60)):
            if whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    return f"{seconds:g}s"


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


IMPORTERS: Mapping[str, Callable[[str], tuple[str, list[str]]]] = cfg.FrozenDict({
    "llama-swap": import_llama_swap,
    "manifest": import_manifest,
})
"""The formats ``swapd import`` reads, by the name the command line uses."""
