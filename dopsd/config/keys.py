"""Dotted config keys (`section.field`): setting one on a Config with its value type-checked, turning a YAML
mapping of sections into dotted keys, and reading a command-line `section.field=value` override.

dopsd.config declares the sections and builds configs with these; they take the Config (or its section names)
as an argument, so this module does not import dopsd.config.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from typing import Any

import yaml

from dopsd.config.types import ConfigError, NonFiniteError, coerce, load_yaml
from dopsd.config.validate import range_text


def type_hints(cls: type) -> dict[str, Any]:
    """A config dataclass's resolved field types, looked up in the module that declares it."""
    return typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))


def section_names(config: Any) -> list[str]:
    """The sections of a Config (instance or class): every field but `preset`."""
    return [f.name for f in dataclasses.fields(config) if f.name != "preset"]


def all_keys(config: Any) -> list[str]:
    """Every `section.field` of a Config (instance or class)."""
    cls = config if isinstance(config, type) else type(config)
    hints = type_hints(cls)
    return [f"{s}.{f.name}" for s in section_names(cls) for f in dataclasses.fields(hints[s])]


def unknown_key(key: str, candidates: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(candidates)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def set_value(config: Any, key: str, value: Any) -> None:
    """Set `section.field` on `config` (a dopsd.config.Config; type-checked)."""
    section, _, name = key.partition(".")
    if section not in section_names(config) or not name:
        raise unknown_key(key, all_keys(config))
    obj = getattr(config, section)
    hints = type_hints(type(obj))
    if name not in hints:
        raise unknown_key(key, all_keys(config))
    try:
        setattr(obj, name, coerce(value, hints[name], key))
    except NonFiniteError as err:  # say what a valid value is
        bounds = next(f for f in dataclasses.fields(obj) if f.name == name).metadata.get("bounds")
        raise NonFiniteError(f"{err}; it must be {range_text(bounds)}" if bounds else str(err)) from None


def flatten(data: dict[str, Any], origin: str, sections: list[str]) -> dict[str, Any]:
    """{section: {field: value}} (a YAML file or a preset) as {"section.field": value}; `preset` is skipped."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for section, values in data.items():
        if section == "preset":
            continue
        if section not in sections:
            raise unknown_key(str(section), sections + ["preset"])
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of keys, got {values!r}")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` as (key, value), the value read as YAML (plain text where it is not valid YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=2e-4)")
    key, _, raw = text.partition("=")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
