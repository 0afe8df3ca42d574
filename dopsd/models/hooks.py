"""What the diffusers families (Z-Image, FLUX.2) share behind the adapter protocol: `DiffusersHooks`, their common
base (encoder memory, the feature cache's fingerprint, the diffusers pipeline, LoRA target checks, the protocol
hooks real images answer alike). Loading their parts from a local folder: dopsd.models.local."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dopsd.config import ConfigError
from dopsd.models.local import folder_fingerprint, free_memory, load_part, still_loaded
from dopsd.models.registry import lora_layout

# Default unseen prompts of `dopsd eval` for models that read free text: the concept in settings a subject's
# training photos rarely show.
PHOTO_UNSEEN_PROMPTS = (
    "a photo of {} on a beach",
    "{} in a snowy forest",
    "a watercolor painting of {}",
    "{} on a city street at night",
)


class DiffusersHooks:
    """The protocol hooks the diffusers families (Z-Image, FLUX.2) share: real images have no decoder-based quality
    or attribute scorer of their own (health and the probe use their generic measures), eval's unseen prompts are
    photo settings, and LoRA targets must have interchange names.

    Memory during feature caching: the transformer is loaded on first use of `network` (after the cache is
    built, when the trainer asks for it), and of the two large encoders (text encoder, VLM teacher) only the one
    running sits on the device; the other waits on the CPU (`_only_on_device`). The VAE (small, and needed
    for samples while training) stays."""

    name: str
    label: str  # the model's name in messages
    device: torch.device
    folder: Path
    cfg: Any  # dopsd.config.ModelConfig
    text_encoder: Any
    tokenizer: Any
    vae: Any
    network: nn.Module
    teacher_max_tokens: int
    layers: tuple[int, ...]  # the text encoder's hidden layers the contexts are built from
    pipeline_name: str  # the family's diffusers pipeline class
    pipeline_kwargs: dict[str, Any] = {}
    _vlm: Any
    _network: Any = None

    def cache_fingerprint(self) -> dict[str, Any]:
        """Settings that change cached contexts but are not in the config's model section."""
        return {
            "adapter_version": 1,
            "teacher_max_tokens": self.teacher_max_tokens,
            "teacher_image_tokens": self.cfg.teacher_image_tokens,
            "layers": list(self.layers),
            "weights": folder_fingerprint(self.folder),
            "teacher_weights": folder_fingerprint(self.cfg.teacher_encoder),
        }

    def release_encoders(self) -> None:
        self.text_encoder = None
        if self._vlm is not None:
            self._vlm.release()
        self._vlm = None
        free_memory()

    # --- the diffusers pipeline (export checks, tests) ------------------------------------------------

    @property
    def pipeline_class(self) -> Any:
        return getattr(importlib.import_module("diffusers"), self.pipeline_name)

    def pipeline(self, transformer: nn.Module | None = None) -> Any:
        """The family's diffusers pipeline around this adapter's parts (the text encoder must still be loaded)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return self.pipeline_class(
            scheduler=load_part(FlowMatchEulerDiscreteScheduler, self.folder, "scheduler"),
            vae=self.vae,
            text_encoder=still_loaded(self.text_encoder, "text encoder"),
            tokenizer=self.tokenizer,
            transformer=transformer or self.network,
            **self.pipeline_kwargs,
        )

    def _only_on_device(self, part: Any) -> Any:
        """`part` (an encoder) on the device, the other large encoder moved to the CPU first; nothing moves when
        the device is the CPU."""
        if self.device.type == "cpu":
            return part
        vlm = self._vlm.model if self._vlm is not None else None
        moved = False
        for other in (self.text_encoder, vlm):
            if other is not None and other is not part and next(other.parameters()).device != torch.device("cpu"):
                other.to("cpu")
                moved = True
        if moved:
            free_memory()
        if part is not None and next(part.parameters()).device != self.device:
            part.to(self.device)
        return part

    def check_lora_targets(self, modules: list[str]) -> None:
        """ConfigError naming every module without an interchange name (the family's LoraLayout), so a run is refused
        before training rather than ending with a LoRA that diffusers and ComfyUI cannot load."""
        bad = lora_layout(self.name).unexportable(modules)
        if bad:
            shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
            raise ConfigError(
                f"lora.targets: {len(bad)} LoRA module(s) of {self.label} have no name that ComfyUI "
                f"and diffusers both load, so the trained LoRA could not be used outside dopsd: {shown}; "
                "drop them from lora.targets (null = the model's defaults, all of which export)"
            )

    def health_quality(self, prompts: list[str]) -> None:
        return None

    def probe_scorer(self) -> None:
        return None

    def unseen_prompts(self, trigger_word: str) -> list[str]:
        return [p.format(trigger_word) for p in PHOTO_UNSEEN_PROMPTS]
