"""The swapd config an importer assembles, and the commented YAML it is written as.

An importer (``migrate``) fills a :class:`Draft`: profiles, top-level settings, and
what it could not carry over. :func:`render` writes it out as a config a person
reviews: each value on one line, quoted wherever swapd's YAML would misread it, and
comments that cannot end early (a line break or a control character in a note would
turn the rest into config, or make the file invalid).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import attrs
import yaml

from swapd import config as cfg
from swapd.config.flags import FlagValue

LLAMA_SWAP_LISTEN = ":8080"
"""llama-swap's default listen address (its ``--listen`` flag), for the output's comment."""
_UNPRINTABLE = re.compile("[^\t\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""What YAML does not allow in a file, not even in a comment (and line breaks)."""


@attrs.define
class DraftProfile:
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
    source: str = ""  # the model's id in the imported config
    pinned: bool = False
    preload: bool = False


@attrs.define
class Draft:
    """The swapd config being assembled, and what could not be carried over."""

    source: str
    command: list[str] | None = None
    command_note: str | None = None
    env: dict[str, str] = attrs.field(factory=dict)
    start_timeout: float | None = None
    stop_timeout: float | None = None
    ttl: float | None = None
    reasoning: bool | None = None
    reasoning_note: str | None = None
    api_key_env: str | None = None
    profiles: list[DraftProfile] = attrs.field(factory=list)
    skipped: list[tuple[str, str, str]] = attrs.field(factory=list)  # name, why, original
    fallbacks: list[dict[str, Any]] = attrs.field(factory=list)
    fallback_note: str | None = None
    unmapped: list[str] = attrs.field(factory=list)
    names: set[str] = attrs.field(factory=set)
    outcomes: dict[str, str] = attrs.field(factory=dict)  # model -> "imported" or why not
    pinned: set[str] = attrs.field(factory=set)  # source model ids kept loaded
    preload: set[str] = attrs.field(factory=set)  # source model ids loaded at start
    residency_note: str | None = None  # why the import asks for residency.mode: budget

    def budget(self, why: str) -> None:
        """Several models at once: the GPU's memory decides (docs/residency.md)."""
        self.residency_note = self.residency_note or why

    def lose(self, where: str, what: str) -> None:
        self.unmapped.append(one_line(f"{where}: {what}"))

    def leave_out(self, model: str, where: str, why: str, advice: str = "",
                  original: str | None = None) -> None:
        """Record that ``model`` is not imported, and why; a comment in the config says so,
        above its ``original`` text."""
        self.outcomes[model] = why = one_line(why)
        self.lose(where, f"{why}; {advice}" if advice else f"{why}; left out")
        self.skipped.append((model, why, original or ""))

    def claim(self, name: str, where: str, model: str | None = None) -> str | None:
        """A valid, unused swapd name for ``name`` (sanitised), or None (and why). For a
        ``model``, its outcome says which."""
        clean = re.sub(r"[^A-Za-z0-9._:/@+-]+", "-", name.strip()).strip("-")
        refused = (f"{name!r} cannot be a swapd name" if not clean else
                   f"the name {clean!r} is already taken" if clean in self.names else None)
        if refused is not None:
            if model is not None:
                self.leave_out(model, where, refused)
            else:
                self.lose(where, f"{refused}; left out")
            return None
        if clean != name:
            self.lose(where, f"{name!r} is not a valid swapd name (letters, digits and "
                      f". _ : / @ + - only); clients must now ask for {clean!r}")
            if model is not None:
                self.outcomes[model] = f"imported as {clean!r}"
        self.names.add(clean)
        return clean



def render(draft: Draft) -> str:
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
            note = f"  # {one_line(draft.command_note)}" if draft.command_note else ""
            out.append(f"  command: {scalar(command)}{note}")
        if draft.env:
            out.append("  env:  # set by every model before; now for every profile")
            out += [f"    {scalar(k)}: {scalar(v)}" for k, v in draft.env.items()]
    if draft.start_timeout is not None or draft.stop_timeout is not None:
        out.append("timeouts:")
        if draft.start_timeout is not None:
            out.append(f"  start: {duration_text(draft.start_timeout)}  # healthCheckTimeout")
        if draft.stop_timeout is not None:
            out.append(f"  stop: {duration_text(draft.stop_timeout)}  # unloadTimeout")
    if draft.ttl is not None:
        out.append(f"ttl: {duration_text(draft.ttl)}  # globalTTL; 0 = never unload")
    if draft.reasoning is not None or draft.reasoning_note:
        value = True if draft.reasoning is None else draft.reasoning
        note = draft.reasoning_note or "sendLoadingState"
        out += ["progress:", f"  reasoning: {scalar(value)}  # {note}"]
    if draft.api_key_env is not None:
        out += ["security:", f"  api_key_env: {draft.api_key_env}  # the key(s) clients "
                "send; set this variable in swapd's environment"]
    if draft.residency_note is not None:
        out += ["residency:", f"  mode: budget  # {one_line(draft.residency_note)}",
                "# gpus: [{id: 0, memory: 24GiB}]  # your GPU's memory; default: nvidia-smi"]
    out += ["", "profiles:"]
    for profile in draft.profiles:
        profile.pinned = profile.source in draft.pinned
        profile.preload = profile.source in draft.preload and not profile.pinned
        out += _render_profile(profile)
    for name, why, original in draft.skipped:
        out.append(f"  # not imported: {one_line(name)} ({why})")
        out += [f"  #   {one_line(line)}" for line in original.strip().splitlines()]
    if draft.fallbacks:
        block = yaml.safe_dump({"fallbacks": draft.fallbacks}, sort_keys=False,
                               default_flow_style=False, allow_unicode=True, width=math.inf)
        out += ["", f"# {draft.fallback_note}", *[f"# {line}" for line in block.splitlines()]]
    return "\n".join(out) + "\n"


def _render_profile(profile: DraftProfile) -> list[str]:
    out = [f"  {scalar(profile.name)}:"]
    out += [f"    # {note}" for note in profile.notes]
    out.append(f"    model: {scalar(profile.model)}")
    if profile.display_name is not None:
        out.append(f"    display_name: {scalar(profile.display_name)}")
    if profile.description is not None:
        out.append(f"    description: {scalar(profile.description)}")
    if profile.aliases:
        out.append(f"    aliases: {scalar(profile.aliases)}")
    if profile.ttl is not None:
        out.append(f"    ttl: {duration_text(profile.ttl)}")
    if profile.keep_cache is not None:
        out.append(f"    keep_cache: {scalar(profile.keep_cache)}")
    if profile.pinned:
        out.append("    pinned: true  # a persistent group's member")
    if profile.preload:
        out.append("    preload: true  # hooks.on_startup.preload")
    if profile.env:
        out.append("    env:")
        out += [f"      {scalar(k)}: {scalar(v)}" for k, v in profile.env.items()]
    if profile.flags:
        out.append("    flags:")
        out += [f"      {scalar(k)}: {scalar(v)}" for k, v in profile.flags.items()]
    return out


def scalar(value: Any) -> str:
    """One YAML value on one line (flow style), quoted wherever YAML would misread it."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=math.inf,
                          sort_keys=False)
    text = text.removesuffix("\n").removesuffix("\n...").strip()
    if yaml.load(text, Loader=cfg.StrictLoader) != value:  # '1e6' is a number to swapd
        text = json.dumps(value, ensure_ascii=False)  # JSON is YAML, every string quoted
    return text


def one_line(text: str) -> str:
    """``text`` for a comment or a list item: a line break would end the comment, and
    what follows it would be read as config; a control character makes the YAML invalid."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], "\\n".join(text.splitlines()))


def duration_text(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if seconds.is_integer():
        whole = int(seconds)
        for unit, size in (("h", 3600), ("m", 60)):
            if whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    return f"{seconds:g}s"
