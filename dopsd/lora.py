"""LoRA through peft, for any torch module (diffusers transformers and the miniature DiT alike)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

ADAPTER = "default"


def add_lora(network: nn.Module, targets: list[str] | str, rank: int, alpha: float, dropout: float = 0.0) -> LoraConfig:
    """Freeze `network` and inject a trainable LoRA adapter on `targets` (module-name suffixes or a regex)."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, init_lora_weights=True)
    network.requires_grad_(False)
    try:
        inject_adapter_in_model(config, network, adapter_name=ADAPTER)
    except ValueError as err:
        from dopsd.config import ConfigError

        raise ConfigError(f"LoRA targets (lora.targets) {targets!r} match no layer of {type(network).__name__}: "
                          f"{err}") from err
    for name, p in network.named_parameters():
        p.requires_grad_("lora_" in name)
    return config


def lora_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """peft-format LoRA weights (`<module>.lora_A.weight`, …), adapter name stripped."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(network, adapter_name=ADAPTER).items()}


def load_lora_state_dict(network: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load peft-format LoRA weights; weights of another model or rank raise WeightsFileError."""
    from dopsd.errors import WeightsFileError

    try:
        result = set_peft_model_state_dict(network, state, adapter_name=ADAPTER)
    except RuntimeError as err:  # shape mismatches: another rank or another model's layer sizes
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise WeightsFileError(f"LoRA weights do not fit this model: {lines[0] if lines else err}") from None
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise WeightsFileError(f"LoRA weights do not fit this model; unexpected keys such as {unexpected[:3]}")


def has_lora(network: nn.Module) -> bool:
    return any("lora_" in n for n, _ in network.named_parameters())
