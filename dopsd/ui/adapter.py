"""The UI's only in-process view of the rest of dopsd: config presets and keys (for the forms), the dataset
check (the one `dopsd train` runs), the trigger-word rule, atomic file writes and the command list.

Everything else (training, probe, sampling, export, plan, bench, demo) runs as `python -m dopsd.cli …`
subprocesses; "will it fit?" in the app's own plan process (`python -m dopsd.ui.fit.worker`, which imports the
planner). When dopsd's modules move, this file and that one are the ones to update.

`python -m dopsd.ui.adapter mini-dataset FOLDER` writes the miniature's concept dataset in a child process,
so the server itself never imports torch.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any

import yaml

from dopsd.commands import COMMANDS
from dopsd.config import load as _load
from dopsd.config import schema as _config
from dopsd.config.keys import set_value
from dopsd.config.presets import PRESETS
from dopsd.config.types import ConfigError
from dopsd.data import dataset as _data
from dopsd.data.dataset import IMAGE_EXTENSIONS, METADATA, DatasetError, apply_trigger
from dopsd.errors import DopsdError
from dopsd.files import atomic_write_bytes, atomic_write_json, atomic_write_text

Config = _config.Config

__all__ = [
    "IMAGE_EXTENSIONS",
    "METADATA",
    "ConfigError",
    "DopsdError",
    "Config",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "presets",
    "methods",
    "key_help",
    "resolve",
    "config_from_yaml",
    "to_yaml",
    "get",
    "check_dataset",
    "check_upload",
    "trigger",
    "has_command",
]

# The settings the New-run form offers (everything else: the YAML view).
FORM_KEYS = (
    "model.pretrained",
    "method.name",
    "train.max_steps",
    "optim.lr",
    "lora.rank",
    "lora.alpha",
    "data.trigger_word",
    "method.prior_prompts",
    "method.prior_weight",
    "sample.every",
    "sample.control_steps",
    "train.checkpoint_every",
)


def presets() -> list[dict[str, Any]]:
    """Each preset: name, description, its resolved config (dict) and the form keys' values."""
    out = []
    for name, (description, _) in PRESETS.items():
        cfg = _load.preset(name)
        out.append(
            {
                "name": name,
                "description": description,
                "config": cfg.to_dict(),
                "form": {k: get(cfg, k) for k in FORM_KEYS},
            }
        )
    return out


def methods() -> list[str]:
    return [str(a) for a in typing.get_args(typing.get_type_hints(_config.MethodConfig)["name"])]


def key_help() -> dict[str, str]:
    """`section.key` -> its documentation, for every config key."""
    out: dict[str, str] = {}
    for section in dataclasses.fields(Config):
        if section.name == "preset":
            continue
        for f in dataclasses.fields(typing.get_type_hints(Config)[section.name]):
            out[f"{section.name}.{f.name}"] = f.metadata.get("help", "")
    return out


def resolve(preset: str, values: dict[str, Any]) -> Config:
    """The preset with typed `section.key` values set one by one (no value is ever parsed as YAML text)."""
    cfg = _load.preset(preset)
    for key, value in values.items():
        set_value(cfg, key, value)
    _load.validate(cfg)
    return cfg


def config_from_yaml(text: str) -> Config:
    """A config from YAML text (as a config file would be read); ConfigError on anything wrong."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"the YAML is not valid: {err}") from err
    cfg = _load.from_dict(data, "the YAML")
    _load.validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return cfg.to_yaml()


def get(cfg: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def set_key(cfg: Config, key: str, value: Any) -> None:
    set_value(cfg, key, value)


def trigger(caption: str, trigger_word: str | None) -> str:
    """The caption as training sees it (placeholder replaced by, or prefixed with, the trigger word)."""
    data = _config.DataConfig(trigger_word=trigger_word or None)
    return apply_trigger(caption, data)


def check_dataset(folder: Path, preset: str = "mini", trigger_word: str | None = None) -> dict[str, Any]:
    """Run the dataset check `dopsd train` runs, for `preset`'s model. Returns {ok, problems, notices, examples}.

    notices: what training will do to the data (resizing, cropping, caption changes), as the check reports it."""
    cfg = _load.preset(preset)
    cfg.data.path = str(folder)
    cfg.data.trigger_word = trigger_word or None
    try:
        report = _data.check_dataset(cfg.data, cfg.model)
    except DatasetError as err:
        return {"ok": False, "problems": list(err.problems), "notices": [], "examples": {}}
    return {
        "ok": True,
        "problems": [],
        "notices": list(report.notes),
        "examples": {e.name: list(e.captions) for e in report.examples},
    }


def check_upload(data: bytes, name: str, preset: str = "mini") -> list[str]:
    """The dataset check's verdict on one uploaded image file (readable, supported, large enough), before it is
    kept; its caption is checked with the whole dataset."""
    cfg = _load.preset(preset)
    with tempfile.TemporaryDirectory(prefix="dopsd-ui-upload-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        return [p.removeprefix(f"{name}: ") for p in _data.check_image(path, cfg.data, cfg.model)]


def has_command(name: str) -> bool:
    """Whether `dopsd NAME` exists in this dopsd (e.g. `plan`, added by a later version)."""
    return name in COMMANDS


def write_mini_dataset(folder: Path) -> list[str]:
    """The miniature's held-out concept dataset (captions use `sks`), through the family registry (the web app
    knows no family's code); written beside, then moved into place."""
    from dopsd.models.registry import example_dataset

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    captions = example_dataset("mini", tmp) or []
    tmp.rename(folder)
    return captions


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "mini-dataset":
        import torch

        torch.set_num_threads(1)
        print("\n".join(write_mini_dataset(Path(sys.argv[2]))))
        sys.exit(0)
    print("usage: python -m dopsd.ui.adapter mini-dataset FOLDER", file=sys.stderr)
    sys.exit(2)
