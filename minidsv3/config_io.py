"""Reading configs: TOML tables and `--section.field=value` overrides into typed frozen dataclasses, and back.

config.py defines what a run is (the dataclasses and their checks); this module only moves values between text,
plain dicts and dataclasses, checking each value against its field's type and naming the field when it does not fit:
    read_toml(path)                 a TOML file -> nested dict
    apply_override(tables, text)    "--train.pretrain_steps=100" sets tables["train"]["pretrain_steps"] = 100
    build(cls, values, prefix)      nested dict -> dataclass, every value type-checked
    to_dict(obj)                    dataclass -> nested dict, JSON/TOML-ready
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config value or combination is invalid; the message names the field and what is allowed."""


def read_toml(path: str | Path) -> dict:
    """The tables of a TOML file; a file that is missing, unreadable, not UTF-8 or not TOML is a ConfigError naming
    the file."""
    path = Path(path)
    if not path.is_file():
        found = "is not a file" if path.exists() else "config file not found"
        raise ConfigError(f"{path}: {found}; give the path of a TOML file such as configs/tiny.toml")
    try:
        text = path.read_bytes().decode("utf-8")  # TOML is UTF-8 by definition, whatever the locale says
        return tomllib.loads(text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror}); check the file's permissions") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start}); save the config as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); see configs/tiny.toml for the format") from None


def apply_override(tables: dict, text: str) -> None:
    """Set the value that `--section.field=value` names in `tables` (nested dicts), in place.

    The value is read as a TOML value when it parses as one (numbers, booleans, quoted strings) and as a bare string
    otherwise: `--model.hidden_size=512` sets 512, `--data.path=some/dir` sets "some/dir"."""
    if not text.startswith("--") or "=" not in text:
        raise ConfigError(f"{text}: overrides are written --section.field=value, e.g. --train.pretrain_steps=100")
    key, raw = text[2:].split("=", 1)
    path = key.split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"{key}: overrides name a section and a field, e.g. --train.pretrain_steps=100")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node = tables
    for k in path[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {k} is not a table")
    node[path[-1]] = value


def build(cls, values: dict, prefix: str = ""):
    """The dataclass `cls` from a dict of its fields (missing ones keep their defaults); unknown keys and values of
    the wrong type raise a ConfigError naming the field as `prefix.field` (`field` at the top level)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    name = {k: f"{prefix}.{k}" if prefix else k for k in values}
    for key in values:
        if key not in known:
            raise ConfigError(f"{name[key]}: unknown key (allowed: {', '.join(sorted(known))})")
    return cls(**{k: check_type(v, hints[k], name[k]) for k, v in values.items()})


def check_type(value, annotation, field: str):
    """Return `value` converted to `annotation`, or raise naming the field. Ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # `X | None`
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return check_type(value, inner, field)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a table, got {type(value).__name__} {value!r}")
        return build(annotation, value, field)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{field}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{field}: expected an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:  # numpy and JAX take 64-bit integers at most
            raise ConfigError(f"{field}: must fit in 64 bits (below 2**63 in magnitude), got {value}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{field}: must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field}: expected a string, got {value!r}")
        if "\0" in value:  # no path may hold one
            raise ConfigError(f"{field}: must not contain a NUL character, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation} for {field}")


def to_dict(obj) -> dict:
    """A config dataclass as a plain nested dict, JSON/TOML-ready (None values dropped: TOML has no null)."""

    def drop_none(d: dict) -> dict:
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    return drop_none(dataclasses.asdict(obj))
