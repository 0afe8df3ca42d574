"""A config from a preset, a YAML file, a dict or a Config, then `section.key=value` overrides, checked.

A YAML file names a preset and overrides some fields:

    preset: mini
    data: {path: ./my_images, trigger_word: sks}
    optim: {lr: 2e-4}

and the command line overrides any field with `section.field=value` (e.g. `optim.lr=2e-4`). Unknown keys are
rejected with the closest valid name; values are checked against the field types (dopsd.config.schema) and
ranges (dopsd.config.validate). The presets' values are dopsd.config.presets; setting and parsing dotted keys is
dopsd.config.keys.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from dopsd.config.keys import flatten, parse_override, set_value
from dopsd.config.presets import PRESETS
from dopsd.config.schema import SECTIONS, Config
from dopsd.config.types import ConfigError, load_yaml
from dopsd.config.validate import validate as check


def preset(name: str) -> Config:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; choose one of {', '.join(PRESETS)}")
    config = Config(preset=name)
    for key, value in flatten(PRESETS[name][1], f"preset {name}", SECTIONS).items():
        set_value(config, key, value)
    return config


def from_dict(data: dict[str, Any], origin: str = "config") -> Config:
    """A preset (data['preset'], default mini) with the given sections applied."""
    name = data.get("preset", "mini") if isinstance(data, dict) else "mini"
    config = preset(str(name))
    for key, value in flatten(data, origin, SECTIONS).items():
        set_value(config, key, value)
    return config


def load_config(source: str | Path | dict[str, Any] | Config, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file, a preset name, a dict or a Config, then `section.key=value` overrides."""
    if isinstance(source, Config):
        config = copy.deepcopy(source)
    elif isinstance(source, dict):
        config = from_dict(source)
    elif str(source) in PRESETS:
        config = preset(str(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config {str(source)!r} is neither a file nor a preset ({', '.join(PRESETS)})")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        config = from_dict(data, str(path))
        if config.data.path and not Path(config.data.path).is_absolute():  # relative to the YAML file
            config.data.path = str((path.parent / config.data.path).resolve())
        # other local paths too, where they exist beside the YAML file ('turbo'/'base' stay keywords)
        for section, key in (
            ("model", "pretrained"),
            ("model", "teacher_encoder"),
            ("data", "source_dir"),
            ("train", "init_from"),
            ("sample", "done_features"),
        ):
            value = getattr(getattr(config, section), key)
            if value and not Path(value).is_absolute() and (path.parent / value).exists():
                setattr(getattr(config, section), key, str((path.parent / value).resolve()))
    for text in overrides or []:
        set_value(config, *parse_override(text))
    validate(config)
    return config


def validate(config: Config) -> None:
    """Every option in its declared range and the relations between options (see dopsd.config.validate)."""
    check(config)


__all__ = ["from_dict", "load_config", "preset", "validate"]
