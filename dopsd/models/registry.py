"""Model families by name: `load_adapter` imports `dopsd.models.<family>` and calls its `load`;
`caption_problems` calls its caption check (the hooks are described in dopsd.models.base)."""

from __future__ import annotations

import importlib
from typing import Any

import torch

FAMILIES = {"mini": "dopsd.models.mini", "zimage": "dopsd.models.zimage", "flux2": "dopsd.models.flux2"}
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


def load_adapter(model_cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> Any:
    """The adapter (see dopsd.models.base.ModelAdapter) for `model_cfg.family`, weights on `device`."""
    module = family_module(model_cfg.family)
    if dtype is None:
        dtype = torch_dtype(model_cfg.dtype)
    elif isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    return module.load(model_cfg, torch.device(device), dtype)
