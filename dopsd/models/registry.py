"""Model families by name: the one place that maps a family name to its module (as a string, so nothing outside
dopsd/models and dopsd/mini imports a family, and the miniature's package is only imported when used).

`load_adapter` imports `dopsd.models.<family>` and calls its `load`; the other functions here reach the family
module functions that need no weights (dopsd.models.base.FamilyModule) and its plan module's `plan_spec`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

FAMILIES = {"mini": "dopsd.mini.adapter", "zimage": "dopsd.models.zimage", "flux2": "dopsd.models.flux2"}
# Each family's `dopsd plan` module (dopsd.models.base.FamilyPlanModule): apart from the family module, which it
# builds on, so that neither imports the other back.
PLAN_MODULES = {"mini": "dopsd.mini.plan", "zimage": "dopsd.models.zimage_plan", "flux2": "dopsd.models.flux2_plan"}
# The built-in model: what a LoRA file or network belongs to when nothing in it names a family (dopsd's own peft
# files from runs that did not record one).
DEFAULT_FAMILY = "mini"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def family_module(family: str) -> Any:
    """The dopsd.models.<family> module (see dopsd.models.base.FamilyModule)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    try:
        return importlib.import_module(FAMILIES[family])
    except ModuleNotFoundError as err:
        if err.name == FAMILIES[family]:
            raise ValueError(f"model family {family!r} is not available in this install ({err.name} missing)") from err
        raise


def caption_problems(model_cfg: Any, captions: list[str]) -> list[Any]:
    """The family's findings (dopsd.models.base.CaptionProblem) on these captions, without loading weights."""
    return list(family_module(model_cfg.family).caption_problems(model_cfg, list(captions)))


def example_dataset(family: str, folder: Path) -> list[str] | None:
    """The family's own small dataset written into `folder` (its captions), or None when it ships none."""
    return family_module(family).example_dataset(folder)


def check_teacher_folder(model_cfg: Any) -> None:
    """The family's check of the folder its teacher context reads (no weights loaded)."""
    family_module(model_cfg.family).check_teacher_folder(model_cfg)


def load_adapter(model_cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> Any:
    """The adapter (see dopsd.models.base.ModelAdapter) for `model_cfg.family`, weights on `device`."""
    module = family_module(model_cfg.family)
    if dtype is None:
        dtype = torch_dtype(model_cfg.dtype)
    elif isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    return module.load(model_cfg, torch.device(device), dtype)


def plan_spec(model_cfg: Any, hint: str | None = None) -> Any:
    """The family's `PlanSpec` (dopsd.models.base) for `model_cfg`: its full-size networks and calls, no weights.

    hint: free text that may name a variant when no local folder says which (e.g. the preset name
    'flux2-klein-9b'); each family decides what it reads from it.
    """
    family_module(model_cfg.family)  # an unknown or unavailable family is named here
    return importlib.import_module(PLAN_MODULES[model_cfg.family]).plan_spec(model_cfg, hint)


# --- LoRA files: what dopsd.lora and dopsd.tools.export need to know of a family, no weights ---------------------------


def lora_layout(family: str) -> Any:
    """The family's interchange layout (dopsd.models.base.LoraLayout), or None when only dopsd loads its LoRAs."""
    return family_module(family).lora_layout()


def interchange_families() -> tuple[str, ...]:
    """The families whose LoRAs other tools load (those with an interchange layout)."""
    return tuple(f for f in FAMILIES if lora_layout(f) is not None)


def family_of_lora(modules: list[str]) -> str | None:
    """The family whose LoRA module names these are (any layout), told by each layout's sign; None if none says."""
    import re

    for family in interchange_families():
        sign = re.compile(lora_layout(family).sign)
        if any(sign.search(m) for m in modules):
            return family
    return None


def family_of_network(network: nn.Module) -> str | None:
    """The family whose denoiser `network` is; None for a network no family owns."""
    return next((f for f in FAMILIES if family_module(f).owns_network(network)), None)


def base_facts(family: str, network: nn.Module | None = None, lora: Mapping[str, Any] | None = None) -> Any:
    """Variant and architecture ids of a family's base model for LoRA metadata (dopsd.models.base.BaseFacts), from
    a denoiser's config or a LoRA's shapes; None when neither tells."""
    return family_module(family).base_facts(network, lora)


# --- bundled public configurations (planning) -------------------------------------------------------------------

FULLSIZE_DIR = Path(__file__).resolve().parent / "fullsize"


def fullsize_config(name: str) -> dict[str, Any]:
    """A bundled public configuration of a supported model (dopsd/models/fullsize/NAME.json; sources in its README)."""
    path = FULLSIZE_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in FULLSIZE_DIR.glob("*.json"))
        raise ValueError(f"no bundled configuration {name!r}; known: {', '.join(known)}")
    return json.loads(path.read_text())


def pipeline_configs(folder: Any, parts: tuple[str, ...], bundled: str) -> tuple[dict[str, Any], str]:
    """Configs of a pipeline's parts: from a local diffusers folder when it has them (the user's actual model),
    else the bundled public ones. Returns ({part: config}, where they came from)."""
    root = Path(str(folder)).expanduser() if folder else None
    if root is not None and all((root / p / "config.json").is_file() for p in parts):
        return {p: json.loads((root / p / "config.json").read_text()) for p in parts}, str(root)
    data = fullsize_config(bundled)
    return {p: data[p] for p in parts}, f"bundled {bundled}.json"


def model_config(folder: Any, bundled: str, key: str = "model") -> tuple[dict[str, Any], str]:
    """A single transformers model's config.json from a local folder, else the bundled one."""
    root = Path(str(folder)).expanduser() if folder else None
    if root is not None and (root / "config.json").is_file():
        return json.loads((root / "config.json").read_text()), str(root)
    return fullsize_config(bundled)[key], f"bundled {bundled}.json"
