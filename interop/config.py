"""Typed, frozen run configurations: YAML files + dotted ``key=value`` overrides -> dataclasses.

A configuration is a tree of frozen dataclasses. Each field's type annotation is the contract
(``int``, ``float``, ``bool``, ``str``, ``X | None``, ``Literal[...]``, ``tuple[X, ...]``,
``tuple[X, Y]``, ``dict[str, X]`` or a nested dataclass); its ``metadata`` may add
``help`` (one line), ``choices`` (allowed values), ``min`` / ``max`` (inclusive bounds).
A dataclass may validate cross-field rules in ``__post_init__`` by raising ``ValueError``; the
message is re-raised as a :class:`ConfigError` under the dataclass's key. A class attribute
``__moved__ = {"old_name": "what replaced it"}`` turns a removed key into an error that says so.

Loading never guesses: an unknown key, a value of the wrong type or a value out of range raises
:class:`ConfigError` naming the dotted key, the bad value and what is allowed::

    cfg = load_config(RunConfig, "configs/quick.yaml", ["data.name=digits", "seed=3"])
    dump_config(cfg, "runs/x/config.yaml")          # the fully resolved config, atomically

Overrides are parsed as YAML scalars (``seed=3`` -> 3, ``flag=true`` -> True, ``x=null`` -> None,
``size=[32,32]`` -> list), except that a ``str`` field takes the text exactly as written.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

from interop._atomic import atomic_write_text

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_help",
    "dump_config",
    "from_dict",
    "load_config",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class _Raw(str):
    """An override's text as typed on the command line, interpreted once the field type is known."""


def _yaml():
    import yaml

    return yaml


def _describe(tp: Any) -> str:
    """Human-readable name of a type annotation (``int``, ``'a' | 'b'``, ``tuple[int, int]``)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
    if origin is dict:
        return f"a mapping to {_describe(typing.get_args(tp)[1])}"
    return getattr(tp, "__name__", str(tp))


def _parse_raw(value: Any) -> Any:
    if isinstance(value, _Raw):
        try:
            return _yaml().safe_load(str(value)) if str(value).strip() else ""
        except _yaml().YAMLError:
            return str(value)
    return value


def _takes_mapping(tp: Any) -> bool:
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict or tp is Any:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_takes_mapping(a) for a in typing.get_args(tp))
    return False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return the typed value or raise ConfigError."""
    origin = typing.get_origin(tp)

    def bad(extra: str = "") -> ConfigError:
        shown = str(value) if isinstance(value, _Raw) else repr(value)
        return ConfigError(f"config key '{key}': got {shown}, expected {_describe(tp)}{extra}")

    if isinstance(value, Mapping) and not _takes_mapping(tp):
        raise ConfigError(
            f"config key '{key}' is a value ({_describe(tp)}), not a section; "
            f"set it directly, e.g. {key}=<value>"
        )
    if dataclasses.is_dataclass(tp):
        value = _parse_raw(value)
        if not isinstance(value, Mapping):
            raise bad()
        return from_dict(tp, value, prefix=key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        parsed = _parse_raw(value)
        if type(None) in args and (parsed is None or (isinstance(parsed, str) and parsed.lower() in ("none", "null"))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise bad()
    if origin is Literal:
        parsed = _parse_raw(value)
        choices = typing.get_args(tp)
        if parsed in choices and type(parsed) in {type(c) for c in choices}:
            return parsed
        if isinstance(value, _Raw) and str(value) in choices:
            return str(value)
        raise bad()
    if origin in (tuple, list):
        parsed = _parse_raw(value)
        if isinstance(parsed, str) and "," in parsed:
            parsed = [_Raw(p.strip()) for p in parsed.split(",")]
        elif isinstance(value, _Raw) and isinstance(parsed, list):
            parsed = [_Raw(p) if isinstance(p, str) else p for p in parsed]
        if not isinstance(parsed, (list, tuple)):
            raise bad()
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(parsed)]
        elif origin is list:
            items = [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(parsed)]
        else:
            if len(parsed) != len(args):
                raise bad(f" (got {len(parsed)} items)")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(parsed, args))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        parsed = _parse_raw(value)
        if not isinstance(parsed, Mapping):
            raise bad()
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in parsed.items()}
    if tp is Any:
        return _parse_raw(value)
    if tp is str:
        if isinstance(value, _Raw):
            return str(value)
        if isinstance(value, str):
            return value
        raise bad()
    parsed = _parse_raw(value)
    if tp is bool:
        if isinstance(parsed, bool):
            return parsed
        raise bad(" (true or false)")
    if tp is int:
        if isinstance(parsed, bool):
            raise bad()
        if isinstance(parsed, int):
            return parsed
        if isinstance(parsed, str):
            try:
                parsed = float(parsed)
            except ValueError:
                raise bad() from None
        if isinstance(parsed, float) and parsed.is_integer():
            return int(parsed)
        raise bad()
    if tp is float:
        if isinstance(parsed, bool):
            raise bad()
        if isinstance(parsed, (int, float)):
            return float(parsed)
        if isinstance(parsed, str):
            try:  # YAML 1.1 reads "1e-3" as a string; users mean a number
                return float(parsed)
            except ValueError:
                raise bad() from None
        raise bad()
    raise ConfigError(f"config key '{key}': unsupported field type {tp!r} (a bug in the config class)")


def _check_metadata(value: Any, field: dataclasses.Field, key: str) -> None:
    meta = field.metadata
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}': got {value!r}, allowed values are {', '.join(map(repr, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    values = value if isinstance(value, (tuple, list)) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and not math.isfinite(v) and not meta.get("nonfinite"):
            raise ConfigError(f"config key '{key}': got {value!r}, expected a finite number (not nan or inf)")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ConfigError(f"config key '{key}': got {value!r}, expected a value in {rng}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, checking every key, type and range.

    Missing keys take the field's default; a field without a default must be present.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    where = f"'{prefix}'" if prefix else "the top level"
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        full = f"{prefix}.{k}" if prefix else str(k)
        moved = getattr(cls, "__moved__", {})  # {old field name: what replaced it}, kept for a clear error
        close = difflib.get_close_matches(str(k), fields, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        if k in moved:
            raise ConfigError(f"config key '{full}' was replaced by {moved[k]}")
        raise ConfigError(
            f"unknown config key '{full}'.{hint} Allowed keys at {where}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config key '{key}' is required ({_describe(hints[name])}) but missing")
            continue
        value = _coerce(data[name], hints[name], key)
        _check_metadata(value, field, key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config {where}: {e}") from e


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """Return a copy of ``data`` with each ``dotted.key=value`` override applied (values kept as text)."""
    import copy

    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. data.name=digits)")
        _set_dotted(out, key, _Raw(value))
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from ``path`` with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file (see configs/)")
    yaml = _yaml()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (a binary file?); pass a YAML file (see configs/)") from None
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read ({e.strerror}); check its permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from an optional YAML file plus ``key=value`` overrides (later ones win)."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def to_dict(cfg: Any) -> Any:
    """Plain-data view of a config (tuples become lists) suitable for YAML or JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config to ``path`` as YAML, atomically; ``load_config`` reads it back equal."""
    atomic_write_text(path, _yaml().safe_dump(to_dict(cfg), sort_keys=False))


def config_help(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf key: ``dotted.key (type, default): help`` — for ``--help`` output."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(config_help(tp, key))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"
        )
        lines.append(f"{key} ({_describe(tp)}, default {default!r}): {f.metadata.get('help', '')}".rstrip(": "))
    return lines
