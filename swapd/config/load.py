"""Entry points: :func:`parse_config`, :func:`load_config`, and the cattrs converter they use.

The converter is built per parse (relative paths resolve against the file's directory);
readers come from the fields' ``Annotated`` metadata, so nothing here knows a field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import (
    BaseValidationError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

from swapd.config.dialect import read_yaml
from swapd.config.model import Config, Fallback, Gpu, Listen, Profile
from swapd.config.problems import _name_problems, _walk
from swapd.config.readers import (
    _LOOPBACK,
    FrozenDict,
    _nonempty_text,
    _port,
    _Problem,
    _Reader,
    _show,
    _text,
    _whole_number,
)
from swapd.errors import ConfigError

T = TypeVar("T")


# --- structuring ---------------------------------------------------------------------


def _reader_of(type_: Any) -> _Reader | None:
    for meta in getattr(type_, "__metadata__", ()):
        if isinstance(meta, _Reader):
            return meta
    return None


def _read_with(reader: _Reader) -> Callable[[Any, Any], Any]:
    return lambda value, _type: reader.read(value)


def _reader_hook(type_: Any) -> Callable[[Any, Any], Any]:
    """The cattrs hook for an ``Annotated[..., _Reader]`` field type."""
    reader = _reader_of(type_)
    if reader is None:
        raise TypeError(f"{type_!r} has no _Reader")
    return _read_with(reader)


def _parse_listen(value: object) -> Listen:
    if isinstance(value, int) and not isinstance(value, bool):
        return Listen(port=_port(value))
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)|(\d+)",
                         value.strip() if isinstance(value, str) else "")
    if match is None:
        raise _Problem(f"expected host:port like 127.0.0.1:9001, [::1]:9001 or :9001, "
                       f"got {_show(value)}", hint="write IPv6 addresses in brackets"
                       if isinstance(value, str) and value.count(":") > 1 else None)
    v6_host, v6_port, host, port, bare_port = match.groups()
    return Listen(host=v6_host or host or _LOOPBACK, port=_port(int(v6_port or port or bare_port)))


def _converter(base_dir: Path | None) -> cattrs.Converter:
    """A converter for one parse: paths resolve against ``base_dir``."""
    conv = cattrs.Converter(forbid_extra_keys=True)

    def structure_class(cl: type) -> Callable[[Any, Any], Any]:
        generated: Callable[[Any, Any], Any] = make_dict_structure_fn(cl, conv)

        def structure(value: object, _type: Any) -> Any:
            if value is None:
                value = {}  # 'timeouts:' with nothing under it: all defaults
            if not isinstance(value, Mapping):
                raise _Problem(f"expected a mapping of settings, got {_show(value)}")
            return generated(value, cl)

        return structure

    structure_listen_mapping = structure_class(Listen)

    def structure_listen(value: object, _type: Any) -> Listen:
        if isinstance(value, Mapping):
            return structure_listen_mapping(value, Listen)  # type: ignore[no-any-return]
        return _parse_listen(value)

    def structure_path(value: object, _type: Any) -> Path:
        text = _nonempty_text(value)
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # '~name/...' for a user this machine does not have
            home = text.split("/", 1)[0]
            raise _Problem(f"{text!r}: there is no user {home[1:]!r} whose home directory "
                           f"{home!r} could mean; write the path out") from None
        return path if path.is_absolute() or base_dir is None else base_dir / path

    def structure_profiles(value: object, _type: Any) -> FrozenDict[str, Profile]:
        if value is None or (isinstance(value, Mapping) and not value):
            raise _Problem("no profiles configured",
                           hint="add at least one profile with a 'model' path")
        if not isinstance(value, Mapping):
            raise _Problem(f"expected a mapping of profile names to profiles, "
                           f"got {_show(value)}")
        profiles: dict[str, Profile] = {}
        errors: list[Exception] = []
        for key, body in value.items():
            name = str(key)
            try:
                profiles[name] = structure_profile(name, body)
            except Exception as error:  # collected and rendered with its path, like cattrs
                error.add_note(IterableValidationNote(f"profile {name!r}", name, Profile))
                errors.append(error)
        if errors:
            raise IterableValidationError("invalid profiles", errors, Mapping)
        return FrozenDict(profiles)

    def structure_profile(name: str, body: object) -> Profile:
        if body is None:
            body = {}
        if not isinstance(body, Mapping):
            raise _Problem(f"expected the profile's settings as a mapping, got {_show(body)}",
                           hint=f"write 'model: {body}' on its own line under '{name}:'"
                           if isinstance(body, str) else None)
        if "name" in body:
            raise _Problem("unknown key 'name'", hint=f"a profile's name is its key, {name!r}")
        return conv.structure({**body, "name": name}, Profile)

    def structure_list(cls: type[T], what: str, hint: str) -> Callable[[Any, Any], tuple[T, ...]]:
        """A list of settings mappings (fallbacks, gpus), each problem with its index."""

        def structure(value: object, _type: Any) -> tuple[T, ...]:
            if value is None:
                return ()
            if not isinstance(value, list):
                raise _Problem(f"expected a list of {what}s, got {_show(value)}", hint=hint)
            items: list[T] = []
            errors: list[Exception] = []
            for index, item in enumerate(value):
                try:
                    items.append(conv.structure(item, cls))
                except Exception as error:  # collected and rendered with its path
                    error.add_note(IterableValidationNote(f"{what} {index}", index, cls))
                    errors.append(error)
            if errors:
                raise IterableValidationError(f"invalid {what}s", errors, tuple)
            return tuple(items)

        return structure

    def strict(check: Callable[[object], Any]) -> Callable[[Any, Any], Any]:
        return lambda value, _type: check(value)

    conv.register_structure_hook(str, strict(_text))
    conv.register_structure_hook(int, strict(_whole_number))
    conv.register_structure_hook(float, strict(_number))
    conv.register_structure_hook(bool, strict(_boolean))
    conv.register_structure_hook(Path, structure_path)
    conv.register_structure_hook_factory(attrs.has, structure_class)
    conv.register_structure_hook(Listen, structure_listen)
    conv.register_structure_hook_func(lambda t: t == Mapping[str, Profile], structure_profiles)
    conv.register_structure_hook_func(
        lambda t: t == tuple[Fallback, ...],
        structure_list(Fallback, "fallback", "start each one with '- name:'"))
    conv.register_structure_hook_func(
        lambda t: t == tuple[Gpu, ...],
        structure_list(Gpu, "gpu", "e.g. gpus: [{id: 0, memory: 24GiB}]"))
    conv.register_structure_hook_factory(lambda t: _reader_of(t) is not None, _reader_hook)
    return conv


def _number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _Problem(f"expected a number, got {_show(value)}")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _Problem(f"expected true or false, got {_show(value)}",
                   hint="only true and false are booleans in swapd's YAML")
# --- entry points --------------------------------------------------------------------


def parse_config(text: str, *, source: str = "config", base_dir: Path | None = None) -> Config:
    """The :class:`Config` in YAML ``text``; raises :class:`ConfigError` with every problem.

    ``source`` names the text in the error; relative paths resolve against ``base_dir``
    (the config file's directory), or stay relative to the working directory without one.
    """
    data = read_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"expected a mapping of settings at the top level, "
                           f"got {_show(data)}"], source=source)
    problems = _name_problems(data)
    try:
        config = _converter(base_dir).structure(data, Config)
    except (BaseValidationError, ValueError) as error:
        problems += _walk(error, "")
    if problems:
        raise ConfigError(problems, source=source)
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path`` (see :func:`parse_config`)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"cannot read the config file: {error.strerror or error}"],
                          source=str(file)) from None
    except UnicodeDecodeError:
        raise ConfigError(["the config file is not UTF-8 text"], source=str(file)) from None
    return parse_config(text, source=str(file), base_dir=file.absolute().parent)


def missing_model_files(config: Config) -> list[str]:
    """A problem for each profile whose model file is not a readable file (now)."""
    problems: list[str] = []
    for profile in config.profiles.values():
        where = f"@ profiles.{profile.name}.model"
        if not profile.model.exists():
            problems.append(f"model file not found: {profile.model} {where}")
        elif not profile.model.is_file():
            problems.append(f"model path is not a file: {profile.model} {where}")
        elif not os.access(profile.model, os.R_OK):
            problems.append(f"model file is not readable: {profile.model} {where}")
    return problems
