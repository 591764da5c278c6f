"""Typed settings ↔ command-line flags ↔ config files.

Every stage's settings are a dataclass whose fields carry a help text in
``field(metadata={"help": ...})``. This module turns such a dataclass (or one that groups several,
like :class:`metainfluence.pipeline.RunSettings`) into argparse flags automatically, reads overrides from
a TOML (``tomllib``) or YAML (``yaml.safe_load``) file, and refuses unknown keys with a one-line
:class:`~metainfluence.errors.SettingsError`.

Precedence: dataclass defaults < ``--config FILE`` < flags given on the command line.

Grouping: a field whose type is itself a settings dataclass is a *group*; in a config file it is a
section (``[train]`` in TOML, ``train:`` in YAML), on the command line its fields get the group's
``flag_prefix`` (metadata), e.g. ``inner.lr`` → ``--inner-lr``. Supported field types: ``bool``,
``int``, ``float``, ``str``, ``tuple[int, ...]`` / ``tuple[float, ...]`` and ``X | None``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from .errors import SettingsError

_NONE_WORDS = ("none", "null", "")


# --------------------------------------------------------------------------- type helpers
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_inner(tp: Any) -> tuple[Any, bool]:
    """(T, True) for ``T | None`` / ``Optional[T]``, else (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _tuple_item(tp: Any) -> Any | None:
    """Item type of ``tuple[T, ...]`` (or ``list[T]``), else None."""
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is list and len(args) == 1:
            return args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


def _type_name(tp: Any) -> str:
    inner, optional = _optional_inner(tp)
    item = _tuple_item(inner)
    name = f"list of {_type_name(item)}" if item is not None else getattr(inner, "__name__", str(inner))
    return name + " or none" if optional else name


def coerce(value: Any, tp: Any, name: str, source: str = "config") -> Any:
    """Check and convert a config-file value (already parsed by TOML/YAML) to the field type."""
    inner, optional = _optional_inner(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional:
            return None
        raise SettingsError(f"{source}: {name} cannot be empty; give a {_type_name(tp)}")
    item = _tuple_item(inner)
    if item is not None:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise SettingsError(f"{source}: {name} must be a list of {_type_name(item)}, got {value!r}")
        return tuple(coerce(v, item, f"{name}[{i}]", source) for i, v in enumerate(value))
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise SettingsError(f"{source}: {name} must be true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{source}: {name} must be an integer, got {value!r}")
        return int(value)
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{source}: {name} must be a number, got {value!r}")
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise SettingsError(f"{source}: {name} must be a string, got {value!r}")
        return value
    raise SettingsError(f"{source}: {name} has an unsupported type {tp!r}")  # pragma: no cover - programming error


def _parse_text(text: str, tp: Any, name: str) -> Any:
    """Convert one command-line word to the field type (argparse ``type=``)."""
    inner, optional = _optional_inner(tp)
    if optional and text.strip().lower() in _NONE_WORDS:
        return None
    try:
        if inner is int:
            return int(text)
        if inner is float:
            value = float(text)
            return value
        return text
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} expects {_type_name(tp)}, got {text!r}") from None


# --------------------------------------------------------------------------- argparse
def _flag_prefix(f: dataclasses.Field) -> str:
    return str(f.metadata.get("flag_prefix", f.name.replace("_", "-") + "-"))


def _help(f: dataclasses.Field, default: Any) -> str:
    text = str(f.metadata.get("help", "")).replace("%", "%%")
    if isinstance(default, tuple):
        shown = " ".join(str(v) for v in default) or "(empty)"
    else:
        shown = "none" if default is None else str(default)
    return f"{text} (default: {shown.replace('%', '%%')})" if text else f"(default: {shown.replace('%', '%%')})"


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    prefix: str = "",
    dest: str = "",
    defaults: Any = None,
    only: typing.Iterable[str] | None = None,
    title: str | None = None,
    exclude: typing.Iterable[str] = (),
) -> list[str]:
    """Add one flag per field of the settings dataclass ``cls`` (recursing into groups); returns their dests.

    Flags are ``--{prefix}{field-name}``; their ``dest`` is the dotted path (``"inner.lr"``) and their
    default is ``argparse.SUPPRESS``, so only flags the user typed appear in the parsed namespace
    (that is what lets a config file sit between the defaults and the command line).
    ``only`` restricts the groups added (top-level group names); ``exclude`` drops top-level fields
    (a command whose own flag has the same name, e.g. ``curvature --method``).
    """
    hints = _hints(cls)
    defaults = defaults if defaults is not None else cls()
    added: list[str] = []
    group_parser: Any = parser.add_argument_group(title) if title else parser
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{dest}{f.name}"
        if _is_group(tp):
            if only is not None and f.name not in only:
                continue
            sub_title = str(f.metadata.get("help", f.name))
            added += add_settings_arguments(
                parser, tp, prefix=prefix + _flag_prefix(f), dest=path + ".", defaults=getattr(defaults, f.name), title=f"{f.name} settings: {sub_title}"
            )
            continue
        if f.metadata.get("cli") is False or f.name in exclude:
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        inner, _ = _optional_inner(tp)
        item = _tuple_item(inner)
        kwargs: dict[str, Any] = {"dest": path, "default": argparse.SUPPRESS, "help": _help(f, default)}
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif item is not None:
            kwargs.update(nargs="*", type=lambda s, _t=item, _n=flag: _parse_text(s, _t, _n), metavar=_type_name(item).upper())
        else:
            kwargs.update(type=lambda s, _t=tp, _n=flag: _parse_text(s, _t, _n), metavar=_type_name(inner).split()[0].upper())
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        group_parser.add_argument(flag, **kwargs)
        added.append(path)
    return added


# words that follow a flag in prose ("raise --lissa-batch or ...") and are no value of it
_PROSE = {"or", "and", "to", "with", "of", "the", "a", "in", "on", "for", "instead", "then", "if", "is", "as"}


def flags_as_set_keys(text: str, parts: typing.Iterable[tuple[type, str]], keep: typing.Iterable[str] = ()) -> str:
    """``text`` with each settings flag of the dataclasses ``parts`` ((class, dest prefix)) written as the ``--set``
    key it is where settings are given by ``--set`` (experiments): ``--max-iter`` → ``--set influence.solve.max_iter``,
    ``--hessian fisher`` → ``--set influence.hessian=fisher``. Flags in ``keep`` (the command's own) stay; a flag of
    several parts is the first part's."""
    actions: dict[str, argparse.Action] = {}
    for cls, dest in parts:
        parser = argparse.ArgumentParser(add_help=False)
        add_settings_arguments(parser, cls, dest=dest)
        actions = {**{a.option_strings[0]: a for a in parser._actions if a.option_strings}, **actions}
    own = set(keep)

    def value_of(action: argparse.Action, token: str | None) -> str | None:
        if token is None or token in _PROSE or action.nargs is not None or action.type is None:
            return None
        try:
            action.type(token)
        except (SettingsError, ValueError, TypeError, argparse.ArgumentTypeError):
            return None
        return token if action.choices is None or token in action.choices else None

    def one(m: re.Match) -> str:
        flag, token = m.group(1), m.group(2)
        if flag in own or flag not in actions:
            return m.group(0)
        value = value_of(actions[flag], token)
        return f"--set {actions[flag].dest}" + (f"={value}" if value is not None else f" {token}" if token else "")

    try:
        return re.sub(r"(--[a-z][a-z0-9-]*)(?: (?!--)([^\s(;,]+(?<![.,;:])))?", one, text)
    except Exception:  # it rewrites warnings as they are shown: a message it cannot read is shown as it was
        return text


def namespace_overrides(namespace: argparse.Namespace, dests: typing.Iterable[str]) -> dict[str, Any]:
    """The settings the user typed, as dotted paths (``{"train.steps": 200, ...}``); ``dests`` is
    what :func:`add_settings_arguments` returned."""
    values = vars(namespace)
    return {d: values[d] for d in dests if d in values}


# --------------------------------------------------------------------------- dicts and files
def _known_keys(cls: type, dest: str = "") -> list[str]:
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(dest + f.name)
        if _is_group(hints[f.name]):
            keys += _known_keys(hints[f.name], dest + f.name + ".")
    return keys


def flatten_mapping(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections → dotted keys."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = prefix + str(k)
        if isinstance(v, Mapping):
            out.update(flatten_mapping(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(settings: Any, overrides: Mapping[str, Any], source: str = "config", *, convert: bool = True, _path: str = "") -> Any:
    """A copy of ``settings`` with dotted-path ``overrides`` applied; unknown keys → SettingsError.

    With ``convert`` the values are checked against the field types (config files); without it they
    are taken as given (argparse has already converted them).
    """
    cls = type(settings)
    hints = _hints(cls)
    by_group: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            known = ", ".join(_suggest(_path + key, _known_keys(cls, _path)))
            raise SettingsError(f"{source}: unknown setting {_path + key!r}; known settings include {known}")
        if _is_group(hints[head]):
            if not rest:
                if isinstance(value, Mapping):
                    by_group.setdefault(head, {}).update(flatten_mapping(value))
                    continue
                raise SettingsError(f"{source}: {_path + key!r} is a section; give its settings as a table/mapping ([{_path + key}] in TOML)")
            by_group.setdefault(head, {})[rest] = value
        else:
            if rest or isinstance(value, Mapping):
                raise SettingsError(f"{source}: {_path + head!r} is a single setting, not a section, so {_path + key!r} is unknown; write {head} = value")
            direct[head] = coerce(value, hints[head], _path + key, source) if convert else value
    for head, sub in by_group.items():
        direct[head] = apply_overrides(getattr(settings, head), sub, source, convert=convert, _path=_path + head + ".")
    return dataclasses.replace(settings, **direct)


def _suggest(key: str, known: list[str], limit: int = 6) -> list[str]:
    import difflib

    close = difflib.get_close_matches(key, known, n=limit, cutoff=0.5)
    leaves = [k for k in known if k not in close]
    return (close + leaves)[:limit]


def _toml():
    """The TOML reader: the standard library's from Python 3.11, ``tomli`` before."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``, e.g. a run's
    ``settings.json``) settings file into a dict."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SettingsError(f"config file {path} does not exist; check the path given to --config")
    suffix = path.suffix.lower()
    text = path.read_bytes()
    if suffix == ".toml":
        tomllib = _toml()
        try:
            data = tomllib.loads(text.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"config file {path} is not valid TOML ({str(exc).splitlines()[0]}); fix the syntax") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            first = " ".join(str(exc).split())
            raise SettingsError(f"config file {path} is not valid YAML ({first}); fix the syntax") from None
        if data is None:
            data = {}
    elif suffix == ".json":
        import json

        try:
            data = json.loads(text.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"config file {path} is not valid JSON ({exc}); fix the syntax") from None
    else:
        raise SettingsError(f"config file {path} has an unknown extension {suffix!r}; use .toml, .yaml/.yml or .json")
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a table/mapping of settings at the top level")
    return data


def parse_sets(items: typing.Iterable[str], source: str = "--set") -> dict[str, Any]:
    """``SECTION.KEY=VALUE`` items as a nested dict to lay over a config file's (:func:`merge_config`). The
    value is read as TOML, as in a config file (``5``, ``1e-3``, ``["a", "b"]``, ``true``); a bare word is a string."""
    tomllib = _toml()

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = [p.strip() for p in key.split(".")]
        if not sep or len(parts) < 2 or not all(parts):
            raise SettingsError(f"{source} {item!r}: write SECTION.KEY=VALUE, e.g. {source} data.k_shot=5")
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingsError(f"{source} {item!r}: {part!r} is a setting, not a section")
        node[parts[-1]] = parsed
    return out


def merge_config(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (a config file's sections) with ``over`` laid on top, section by section."""
    merged = dict(base)
    for k, v in over.items():
        merged[k] = merge_config(merged[k], v) if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping) else v
    return merged


def config_sections(path: str | os.PathLike, owned: typing.Iterable[str], known: typing.Iterable[str]) -> dict[str, Any]:
    """The sections of a config file that one command owns. One file can serve every command: each
    takes its own sections and leaves the others, but a section no command knows is an error that
    names the valid ones (a typo must not be silently ignored)."""
    data = read_config_file(path)
    known = list(known)
    unknown = [k for k in data if k not in known]
    if unknown:
        raise SettingsError(f"config {path}: unknown section {unknown[0]!r}; the sections are {', '.join(known)}")
    owned = set(owned)
    return {k: v for k, v in data.items() if k in owned}


def load_settings(settings: Any, config: str | os.PathLike | Mapping[str, Any] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Any:
    """``settings`` (defaults), then the config file (a path, or its already-read sections), then
    command-line ``overrides`` (dotted keys)."""
    if isinstance(config, Mapping):
        settings = apply_overrides(settings, config, source="config")
    elif config is not None:
        settings = apply_overrides(settings, read_config_file(config), source=f"config {config}")
    if overrides:
        settings = apply_overrides(settings, overrides, source="command line", convert=False)
    return settings


def settings_from_dict(cls: type, data: Mapping[str, Any], source: str = "settings") -> Any:
    """Rebuild a settings dataclass from its JSON form (e.g. a checkpoint's record)."""
    return apply_overrides(cls(), dict(data), source=source)


def to_dict(settings: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) — the form written to JSON and config files."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v

    return conv(settings)


def with_new_defaults(before: Any, now: Any, defaults: Any) -> Any:
    """``before`` (recorded settings, as JSON) with the keys it lacks taken from ``now`` wherever ``now``
    holds the default: a field added in a later version, at its default, then does not make an older
    record differ — so stored stages and ground truth stay resumable across such an upgrade."""
    if not (isinstance(before, dict) and isinstance(now, dict)):
        return before
    out = dict(before)
    for key, value in now.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if key not in out:
            if isinstance(defaults, dict) and key in defaults and value == default:
                out[key] = value
        else:
            out[key] = with_new_defaults(out[key], value, default)
    return out
