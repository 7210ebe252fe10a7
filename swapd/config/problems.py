"""How a config's problems read: cattrs' nested errors walked into ``message @ path`` lines,
unknown keys with a close match, and the client-facing names checked on the raw data.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)

from swapd.config.model import Config, Profile
from swapd.config.readers import FrozenDict, _join, _Problem, _show, _where

_REQUIRED_HINTS: Mapping[tuple[type, str], str] = FrozenDict({
    (Config, "profiles"): "add at least one profile with a 'model' path",
    (Profile, "model"): "the path of the .gguf file to load",
})




def _walk(error: BaseException, path: str) -> Iterator[str]:
    """Every problem inside ``error`` (cattrs' nested groups), as ``message @ path``."""
    if isinstance(error, ClassValidationError):
        with_notes, without = error.group_exceptions()
        for sub, note in with_notes:
            if isinstance(sub, KeyError):
                hint = _REQUIRED_HINTS.get((error.cl, note.name))
                yield (f"missing required key {note.name!r}{_where(path)}"
                       + (f" — {hint}" if hint else ""))
            else:
                yield from _walk(sub, _join(path, note.name))
        for sub in without:
            yield from _walk(sub, path)
    elif isinstance(error, IterableValidationError):
        indexed, unindexed = error.group_exceptions()
        for item, inote in indexed:
            index = inote.index
            yield from _walk(item, _join(path, f"[{index}]" if isinstance(index, int)
                                         else str(index)))
        for item in unindexed:
            yield from _walk(item, path)
    elif isinstance(error, ForbiddenExtraKeysError):
        for key in sorted(error.extra_fields, key=str):
            yield _unknown_key(key, path, error.cl)
    elif isinstance(error, BaseExceptionGroup):
        for member in error.exceptions:
            yield from _walk(member, path)
    elif isinstance(error, _Problem):
        yield error.render(path)
    elif isinstance(error, ValueError | TypeError):
        yield f"{error}{_where(path)}"
    else:
        yield f"{type(error).__name__}: {error}{_where(path)}"


def _unknown_key(key: object, path: str, cl: type) -> str:
    known = [field.name for field in attrs.fields(cl)
             if not (cl is Profile and field.name == "name")]
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.7)
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif cl is Profile:
        hint = "llama-server flags go under 'flags:'"
    else:
        hint = f"known keys here: {', '.join(known)}"
    return f"unknown key {key!r}{_where(path)} — {hint}"


# --- names ---------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9._:/@+-]+")
_NAME_RULE = "use letters, digits and . _ : / @ + - only (no spaces)"


def _name_problems(data: Mapping[Any, Any]) -> list[str]:
    """Malformed or duplicate client-facing names, from the raw YAML.

    Profile names are claimed first, then aliases, then fallback names, so a clash is
    blamed on the alias or fallback rather than on the profile it collides with. Values of
    the wrong type are skipped here; the structuring pass reports those.
    """
    problems: list[str] = []
    owners: dict[str, str] = {}

    def claim(name: object, path: str, owner: str) -> None:
        if not isinstance(name, str):
            problems.append(f"a name must be text, got {_show(name)}{_where(path)}"
                            f" — quote it: '{_show(name)}'")
        elif not _NAME.fullmatch(name):
            problems.append(f"invalid name {name!r}{_where(path)} — {_NAME_RULE}")
        elif name in owners:
            problems.append(f"duplicate name {name!r}{_where(path)} — already used by "
                            f"{owners[name]}")
        else:
            owners[name] = owner

    profiles = data.get("profiles")
    profiles = profiles if isinstance(profiles, Mapping) else {}
    for key in profiles:
        claim(key, "profiles", f"profile '{key}'")
    for key, body in profiles.items():
        aliases = body.get("aliases") if isinstance(body, Mapping) else None
        aliases = [aliases] if isinstance(aliases, str) else aliases
        if isinstance(aliases, list):
            for alias in aliases:
                if isinstance(alias, str):
                    claim(alias, f"profiles.{key}.aliases", f"profile '{key}'")
    fallbacks = data.get("fallbacks")
    for index, fallback in enumerate(fallbacks if isinstance(fallbacks, list) else []):
        name = fallback.get("name") if isinstance(fallback, Mapping) else None
        if isinstance(name, str):
            claim(name, f"fallbacks[{index}].name", f"fallback '{name}'")
    return problems
