"""What the New-run form may accept, read from the config's own declarations (each field's type and its ge/gt/le/lt
bounds in dopsd.config.schema), so the browser checks a value with the same rule `dopsd train` applies and a
range is declared once. The page gets them with the presets (/api/presets → "rules").

One rule is the form's own: `train.max_steps` at most FORM_MAX_STEPS. The config has no upper bound (a long run
is legitimate), but in a form an extra zero or a pasted 1e9 queues a run that would take years; a longer run is
set in the YAML view, which only the config's bounds limit.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from dopsd.config import schema
from dopsd.config.keys import type_hints
from dopsd.ui.home import NAME_RE

FORM_MAX_STEPS = 100_000
FORM_LIMITS = {
    "train.max_steps": {
        "le": FORM_MAX_STEPS,
        "why": f"the form takes at most {FORM_MAX_STEPS:,} steps (a guard against a typo such as an extra zero); "
        "set a longer run in the YAML view",
    }
}
# The run name rule (dopsd.ui.home.NAME_RE) for an <input pattern>: Chrome compiles patterns with the `v` flag,
# where a bare '-' inside a class is an error that silently disables the pattern, so it is escaped here.
NAME_PATTERN = NAME_RE.pattern.strip("^$").replace("._-]", r"._\-]")
NAME_RULE = "1–64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"


def _kind(tp: Any) -> tuple[str, bool, list[Any] | None]:
    """(int | float | text | lines | choice | bool, nullable, choices) for a field's annotation."""
    args = typing.get_args(tp)
    nullable = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        nullable = type(None) in args
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else tp
        args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return "choice", nullable, list(args)
    if typing.get_origin(tp) is list:
        return "lines", nullable, None
    return {int: "int", float: "float", bool: "bool"}.get(tp, "text"), nullable, None


def field_rule(key: str) -> dict[str, Any]:
    section, _, name = key.partition(".")
    cls = type_hints(schema.Config)[section]
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind, nullable, choices = _kind(type_hints(cls)[name])
    rule: dict[str, Any] = {"type": kind, "nullable": nullable, **f.metadata.get("bounds", {})}
    if choices is not None:
        rule["choices"] = choices
    limit = FORM_LIMITS.get(key)
    if limit:
        rule["le"] = min(limit["le"], rule.get("le", limit["le"]))
        rule["why"] = limit["why"]
    return rule


def form_rules(keys: typing.Iterable[str]) -> dict[str, Any]:
    """{section.key: rule} for the form's settings, plus the run name's rule under "name"."""
    out: dict[str, Any] = {key: field_rule(key) for key in keys}
    out["name"] = {"type": "text", "pattern": NAME_PATTERN, "rule": NAME_RULE}
    return out


def form_limit_problem(values: dict[str, Any]) -> dict[str, str]:
    """The form's own limits, checked again on the server (a script or an old page may skip the browser's)."""
    out = {}
    for key, limit in FORM_LIMITS.items():
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit["le"]:
            out[key] = f"{value:g} is too many: {limit['why']}"
    return out
