"""LoRA through peft, for any torch module (diffusers transformers and the miniature DiT alike)."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

from dopsd.config import ConfigError
from dopsd.errors import WeightsFileError

ADAPTER = "default"


def add_lora(
    network: nn.Module,
    targets: list[str] | str,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> LoraConfig:
    """Freeze `network` and inject a trainable LoRA adapter on `targets` (module-name suffixes or a regex);
    `rank_pattern` / `alpha_pattern` give single modules (exact names) another rank / alpha."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=True,
        rank_pattern=_exact(rank_pattern),
        alpha_pattern=_exact(alpha_pattern),
    )
    network.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            # peft warns that LoRA layers over torchao-quantized weights (model.quantize) cannot be merged into
            # them; dopsd never merges, it exports the LoRA factors.
            warnings.filterwarnings("ignore", message=".*without `get_apply_tensor_subclass`")
            inject_adapter_in_model(config, network, adapter_name=ADAPTER)
    except ValueError as err:
        raise ConfigError(
            f"LoRA targets (lora.targets) {targets!r} match no layer of {type(network).__name__}: {err}"
        ) from err
    for name, p in network.named_parameters():
        p.requires_grad_("lora_" in name)
    return config


def _exact(pattern: dict[str, Any] | None) -> dict[str, Any]:
    # peft matches pattern keys as regexes against the end of a module name: anchor and escape exact names
    return {f"^{re.escape(name)}$": value for name, value in (pattern or {}).items()}


def exact_targets(modules: list[str]) -> str:
    """A peft target regex that matches exactly these module names."""
    return "^(?:" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"


def lora_modules(network: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (lora_A, lora_B · scale)}: the trained LoRA with peft's scale (alpha / r) folded into lora_B."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in network.named_modules():
        name = name.replace("_orig_mod.", "").removeprefix("module.")  # torch.compile / DDP wrappers
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            a = module.lora_A[ADAPTER].weight.detach()
            b = module.lora_B[ADAPTER].weight.detach()
            out[name] = (a.float().cpu(), b.float().cpu() * float(module.scaling[ADAPTER]))
    return out


def lora_module_names(network: nn.Module) -> list[str]:
    """Names of the modules that carry the LoRA adapter (wrapper prefixes stripped, as in `lora_modules`)."""
    from peft.tuners.lora import LoraLayer

    return [
        name.replace("_orig_mod.", "").removeprefix("module.")
        for name, module in network.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    ]


def lora_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """peft-format LoRA weights (`<module>.lora_A.weight`, …), adapter name stripped."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(network, adapter_name=ADAPTER).items()}


def load_lora_state_dict(network: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load peft-format LoRA weights; weights of another model or rank raise WeightsFileError."""
    try:
        result = set_peft_model_state_dict(network, state, adapter_name=ADAPTER)
    except RuntimeError as err:  # shape mismatches: another rank or another model's layer sizes
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise WeightsFileError(f"LoRA weights do not fit this model: {lines[0] if lines else err}") from None
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise WeightsFileError(f"LoRA weights do not fit this model; unexpected keys such as {unexpected[:3]}")
