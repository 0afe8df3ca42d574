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

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

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


# --- planning: what `dopsd plan` needs to know about a family, before anything is downloaded ---------------
# Each family module exposes `plan_spec(model_cfg, hint=None) -> PlanSpec` (through
# `dopsd.models.registry.plan_spec`). The planner builds the parts on the meta device from the spec, runs them on
# fake tensors and never looks at the family; everything family-specific (configs, inputs at a resolution,
# token counts, the encoders the feature cache runs and what is loaded meanwhile) lives behind this interface.


@dataclass
class PlanCall:
    """One kind of denoiser call at a resolution (the student's or the teacher's).

    context(batch) builds what `PlanSpec.velocity` takes for `batch` samples (called inside the planner's fake
    mode, so its tensors cost nothing); tokens names the sequence parts the transformer attends over.
    """

    context: Callable[[int], Any]
    tokens: dict[str, int]


@dataclass
class PlanStage:
    """One phase of feature caching: the encoder call it runs and what is loaded on the device meanwhile."""

    name: str
    uses: tuple[str, ...]  # parts the call itself needs
    resident: tuple[str, ...]  # parts loaded on the device while it runs (as the adapter loads them today)
    run: Callable[[dict[str, nn.Module], int, int], Any]  # one no-grad encoder call: (built parts, height, width)
    needed_by: str = "student"  # which features it computes: "student" (always), "teacher" or "latents" (SFT)


@dataclass
class PlanCheck:
    """A sequence/position limit at the planned resolution (e.g. RoPE table coverage)."""

    what: str
    ok: bool
    detail: str


@dataclass
class PlanSpec:
    """A family's full-size networks and calls, as the trainer would run them for one config."""

    label: str  # e.g. "Z-Image-Turbo"
    dtype: torch.dtype  # weight dtype (model.dtype)
    parts: dict[str, Callable[[dict[str, int]], nn.Module]]  # name -> build(depth overrides) (called on meta)
    depth: dict[str, int]  # denoiser config keys of identical repeated blocks -> their full counts
    lora_targets: list[str] | str  # the adapter's default LoRA targets
    latent_shape: Callable[[int, int], tuple[int, ...]]  # (height, width) -> one sample's latents
    student: Callable[[int, int], PlanCall]
    teacher: Callable[[int, int], PlanCall]
    velocity: Callable[[nn.Module, torch.Tensor, torch.Tensor, Any], torch.Tensor]  # the adapter's own
    rollout_steps: int  # K: roll-out states per D-OPSD loss
    caching: list[PlanStage] = field(default_factory=list)
    kept_while_training: tuple[str, ...] = ()  # parts besides the denoiser that stay loaded (e.g. the VAE)
    checks: Callable[[int, int], list[PlanCheck]] = lambda h, w: []
    denoiser: str = "transformer"
    sources: dict[str, str] = field(default_factory=dict)  # part -> where its configuration came from
    notes: list[str] = field(default_factory=list)
