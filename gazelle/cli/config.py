"""Typed run configs for the CLI verbs: YAML in, dotted overrides (`train.learning_rate=1e-4`) on top.

A config is a dataclass whose fields are plain values or nested dataclasses; unknown keys and values of
the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from gazelle.errors import GazelleError


def _parse_scalar(text: str) -> Any:
    """An override's value, read as YAML so that 1e-4, true, [q_proj, v_proj] and null mean what they say."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and where unambiguous convert) a value against a field's annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except GazelleError:
                continue
        raise GazelleError(f"{key}: {value!r} fits none of {annotation}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise GazelleError(f"{key} must be a list, got {value!r}")
        return list(value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise GazelleError(f"{key} must be a mapping, got {value!r}")
        return value
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise GazelleError(f"{key} must be true or false, got {value!r}")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str):
        return value
    if annotation in (int, float, str):
        raise GazelleError(f"{key} must be {annotation.__name__}, got {value!r}")
    return value


def section(cls, **defaults):
    """A nested config field whose defaults differ from `cls`'s own; a partial YAML section or an override
    changes only the keys it names and keeps these defaults for the rest."""
    return dataclasses.field(default_factory=lambda: cls(**defaults), metadata={"defaults": defaults})


def build(cls, data: dict, prefix: str = ""):
    """An instance of dataclass `cls` from a (nested) mapping."""
    if not isinstance(data, dict):
        raise GazelleError(f"{prefix or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise GazelleError(f"unknown config key {prefix}{unknown[0]}; valid keys here: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            defaults = fields[name].metadata.get("defaults", {})
            values[name] = build(hint, {**defaults, **(value or {})}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, prefix + name)
    return cls(**values)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise GazelleError(f"override {dotted}: {key} is not a section")
    data[keys[-1]] = value


def load_config(cls, path: str | None, overrides: list[str]):
    """The `cls` config from YAML file `path` (None: defaults) with `key.sub=value` overrides applied."""
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise GazelleError(f"config file {path} not found")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise GazelleError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise GazelleError(f"override {item!r} must look like section.field=value")
        set_dotted(data, key.strip(), _parse_scalar(text))
    return build(cls, data)


def to_yaml(config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
