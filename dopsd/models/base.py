"""The protocol every model family implements; the trainer, sampler, probe and bench only talk to this.

An adapter translates between the project's conventions and its model's own:
  * latents are one batch tensor (B, …) in the project's σ convention (σ=1 noise, σ=0 clean);
  * `velocity` returns v = ε − x0 for a batch of latents at per-sample σ (B,), whatever the model's own
    timestep convention or output sign;
  * contexts are built per sample as dicts of tensors (so they can be cached on disk by content hash)
    and batched by `collate`; the objective never looks inside them.

Each family module (dopsd.models.<family>, listed in `dopsd.models.registry.FAMILIES`) defines two
module-level functions, reached through the registry (see `FamilyModule`):
  * `load(model_cfg, device, dtype) -> ModelAdapter`;
  * `caption_problems(model_cfg, captions) -> list[CaptionProblem]`: what the family's text side cannot read
    or will change, found without loading weights (the dataset check calls it on every caption at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

Context = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CaptionProblem:
    """One finding of a family's caption check.

    index: which caption of the list it is about; None for a line about all of them (e.g. the words the
    model knows), shown once after the others. message: what is wrong and the fix, without the caption or
    its file (the caller names those). notice: False = the caption cannot be used (the dataset check
    refuses it); True = it is used but changed (e.g. cut at the token limit), said once before training.
    """

    index: int | None
    message: str
    notice: bool = False


class FamilyModule(Protocol):
    """The module-level functions every dopsd.models.<family> module defines."""

    def load(self, model_cfg: Any, device: Any, dtype: Any) -> "ModelAdapter": ...

    def caption_problems(self, model_cfg: Any, captions: list[str]) -> list[CaptionProblem]: ...


@runtime_checkable
class ModelAdapter(Protocol):
    name: str
    network: nn.Module  # the denoiser whose weights are fine-tuned (LoRA or full)

    def velocity(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: Any) -> torch.Tensor:
        """v(x, σ, context) with `network` (the student may be DDP-wrapped; the teacher is not)."""
        ...

    def student_contexts(
        self, captions: list[str], sources: list[list[Image.Image]] | None = None
    ) -> list[Context]:
        """Caption-only conditioning, exactly what inference uses (editing models: + source images)."""
        ...

    def teacher_contexts(
        self, captions: list[str], images: list[Image.Image], sources: list[list[Image.Image]] | None = None
    ) -> list[Context]:
        """Caption + target-image conditioning for the teacher (editing: sources, then the target last)."""
        ...

    def collate(self, contexts: list[Context]) -> Any:
        """Batch per-sample contexts into what `velocity` takes."""
        ...

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Clean latents x0 (for SFT and metrics)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images (B, 3, H, W) in [-1, 1]."""
        ...

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latents (no batch dim) for an image of this size."""
        ...

    def inference_schedule(self, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        """The model's own few-step σ schedule (…, 0) for this resolution."""
        ...

    def default_lora_targets(self) -> list[str] | str:
        """peft target_modules for this family (names or a regex)."""
        ...

    def release_encoders(self) -> None:
        """Free the frozen encoders once contexts are cached (they are not needed while training)."""
        ...
