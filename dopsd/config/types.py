"""Config values from YAML text and overrides: read with YAML 1.2 booleans, checked and converted against each
field's type annotation (dopsd.config declares the fields)."""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from dopsd.errors import DopsdError


class ConfigError(DopsdError, ValueError):
    """A config file or override that does not fit the schema; the message says which key and how to fix it."""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# YAML 1.1 reads yes/no/on/off as booleans, so `train.mixed_precision=no` would arrive as False. Config text is
# read with YAML 1.2's booleans (true/false only) instead; each field then types the words itself: a bool field
# takes yes/no/on/off, a text or choice field keeps them as text. Booleans that still reach a text or choice field
# (Python dicts, `true`/`false` in YAML) are mapped deliberately below.
YAML11_BOOLS = {"yes": True, "no": False, "on": True, "off": False, "true": True, "false": False}


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 booleans: only true/false (any case) are booleans."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """Config text (a file or one override value) as data, with YAML 1.2 booleans (see ConfigLoader)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass


class NonFiniteError(ConfigError):
    """A float option given as nan/inf (kept apart so unions report it instead of a generic type mismatch)."""


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (accepting numeric strings for numbers); raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"config key {key!r}: expected {type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in sorted(args, key=lambda a: a is str):  # try str last so 'null'/numbers keep their types
            try:
                return coerce(value, arg, key)
            except NonFiniteError:
                raise
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        raise bad
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        # A yes/no word or boolean for a choice that has exactly one yes/no-spelled option means that option
        # (mixed_precision: false / off -> 'no').
        truth = (
            YAML11_BOOLS.get(value.lower()) if isinstance(value, str) else value if isinstance(value, bool) else None
        )
        spelled = [a for a in args if isinstance(a, str) and YAML11_BOOLS.get(a.lower()) is truth]
        if truth is not None and len(spelled) == 1:
            return spelled[0]
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, args))}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (*YAML11_BOOLS, "1", "0"):
            return YAML11_BOOLS.get(value.lower(), value == "1")
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        number = _number(value)  # 1e4 or 1000.0 steps: whole numbers written as floats
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)
        raise bad
    if tp is float:
        number = _number(value)
        if number is None:
            raise bad
        if not math.isfinite(number):
            raise NonFiniteError(f"config key {key!r}: {value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # `true`/`false` where text is expected: the text as written
            return str(value).lower()
        if isinstance(value, (int, float)):  # a folder or word that happens to be a number
            return str(value)
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {str(k): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _number(value: Any) -> float | None:
    """A float from a number or numeric text (YAML reads 1e-4 as text); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
