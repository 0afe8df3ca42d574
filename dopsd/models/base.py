"""The protocol every model family implements; the trainer, sampler, probe, export and bench only talk to this.

An adapter translates between the project's conventions and its model's own:
  * latents are one batch tensor (B, …) in the project's σ convention (σ=1 noise, σ=0 clean);
  * `velocity` returns v = ε − x0 for a batch of latents at per-sample σ (B,), whatever the model's own
    timestep convention or output sign;
  * contexts are built per sample as dicts of tensors (so they can be cached on disk by content hash)
    and batched by `collate`; the objective never looks inside them.

Each family module (dopsd.models.<family>, listed by name in `dopsd.models.registry.FAMILIES`) defines the
module-level functions of `FamilyModule`, reached through the registry; they need no weights (the dataset check
and `dopsd export` call them before or without loading a model). Its plan module (`registry.PLAN_MODULES`)
defines `plan_spec` (`FamilyPlanModule`, below).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

Context = dict[str, torch.Tensor]
Pair = tuple[torch.Tensor, torch.Tensor]  # one LoRA module: (lora_A: r × in, lora_B: out × r)
QualityFn = Callable[[torch.Tensor, list[str]], float]  # (decoded images in [-1, 1], their prompts) -> quality


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


@dataclass(frozen=True)
class LoraLayout:
    """A family's LoRA interchange layout: the one set of keys that diffusers and ComfyUI both load.

    The rows are data; the one generic routine each way (dopsd.lora.layout) converts with them and knows no family.
    rows: (module as dopsd trains it (diffusers names), module in the interchange layout, slot in a fused q/k/v
    projection or None); `{name}` fields are placeholders, tried in order. placeholders: (name, regex it matches).
    sign: a regex that module names of this family's LoRAs match in any layout (how a file's family is told from
    its keys). implementation: whose module names the interchange keys follow (`modelspec.implementation`).
    """

    rows: tuple[tuple[str, str, int | None], ...]
    placeholders: tuple[tuple[str, str], ...]
    sign: str
    implementation: str

    def pattern(self, template: str) -> re.Pattern[str]:
        """A row's module template as a regex, each `{name}` placeholder a group matching its regex."""
        pattern = re.escape(template)
        for name, value in self.placeholders:
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{value})")
        return re.compile(pattern)

    def unexportable(self, modules: list[str]) -> list[str]:
        """The modules (dopsd's diffusers names) that have no name in this layout."""
        trained = [self.pattern(row[0]) for row in self.rows]
        return [m for m in modules if not any(p.fullmatch(m) for p in trained)]


@dataclass(frozen=True)
class BaseFacts:
    """What a LoRA file's metadata says about its base model (dopsd.lora.meta)."""

    variant: str  # e.g. "FLUX.2-klein 4B"
    architecture: str  # modelspec id of the base, e.g. "Flux.2-klein-4b"
    base_version: str  # ss_base_model_version, e.g. "flux_2_klein_4b"


class FamilyModule(Protocol):
    """The module-level functions every dopsd.models.<family> module (and dopsd.mini.adapter) defines."""

    def load(self, model_cfg: Any, device: Any, dtype: Any) -> "ModelAdapter":
        """The adapter with its weights on `device` (model_cfg: dopsd.config.ModelConfig)."""
        ...

    def caption_problems(self, model_cfg: Any, captions: list[str]) -> list[CaptionProblem]:
        """What the family's text side cannot read or will change, found without loading weights (the dataset
        check calls it on every caption at once)."""
        ...

    def check_teacher_folder(self, model_cfg: Any) -> None:
        """Raises ModelFolderError when the configured teacher context needs a folder that is missing or wrong,
        without loading weights (called before any work when the method uses the teacher)."""
        ...

    def lora_layout(self) -> LoraLayout | None:
        """The interchange layout of the family's LoRA files; None when only dopsd loads them."""
        ...

    def owns_network(self, network: nn.Module) -> bool:
        """Whether `network` is this family's denoiser (how a bare network's LoRA file learns its family)."""
        ...

    def base_facts(self, network: nn.Module | None = None, lora: Mapping[str, Pair] | None = None) -> BaseFacts | None:
        """Variant and architecture ids for LoRA file metadata: from the denoiser's config, else from a LoRA's
        shapes ({module: (A, B)}); None when neither tells."""
        ...

    def example_dataset(self, folder: Any) -> list[str] | None:
        """Writes a small dataset of the family's own (image-caption pairs) into `folder` and returns its captions;
        None, writing nothing, when the family ships none (the web app offers it as a first dataset)."""
        ...


@runtime_checkable
class ModelAdapter(Protocol):
    name: str  # the family (a key of dopsd.models.registry.FAMILIES)
    kind: (
        str | None
    )  # which of the family's named weights are loaded (mini: turbo/base/random); None: model.pretrained says it
    network: nn.Module  # the denoiser whose weights are fine-tuned (LoRA or full)
    device: torch.device  # where the adapter's parts run
    dtype: torch.dtype  # the frozen weights' dtype
    # Teacher contexts that carry the target image, the family's default first (model.teacher_context); every
    # family also accepts "text", a caption-only control.
    teacher_context_kinds: tuple[str, ...]
    teacher_context: str  # the one in use
    lora_layout: LoraLayout | None  # as the family module's lora_layout()
    pipeline_class: type | None  # the diffusers pipeline the trained LoRA loads into; None when there is none
    shard_blocks: tuple[str, ...]  # class names of the denoiser's repeated blocks: FSDP shards each (train.fsdp)

    def velocity(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: Any) -> torch.Tensor:
        """v(x, σ, context) with `network` (the student may be DDP-wrapped; the teacher is not)."""
        ...

    def student_contexts(self, captions: list[str], sources: list[list[Image.Image]] | None = None) -> list[Context]:
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

    def check_lora_targets(self, modules: list[str]) -> None:
        """Raise ConfigError naming every injected LoRA module that the family's LoRA files cannot carry (no
        interchange name), so a run is refused before training instead of ending with weights other tools
        cannot load. Called right after the LoRA is injected."""
        ...

    def release_encoders(self) -> None:
        """Free the frozen encoders once contexts are cached (they are not needed while training)."""
        ...

    def cache_fingerprint(self) -> dict[str, Any]:
        """What cached contexts depend on besides the config's model section (dopsd.data.cache)."""
        ...

    def health_quality(self, prompts: list[str]) -> QualityFn | None:
        """A decoder-based few-step quality for few-step health on these prompts, or None when the family has none."""
        ...

    def probe_scorer(self) -> Any:
        """The family's own `dopsd probe` scorer (a dopsd.tools.probe.scorers.Scorer), or None for the generic ones."""
        ...

    def unseen_prompts(self, trigger_word: str) -> list[str]:
        """Prompts with the concept's word in settings no training caption shows (`dopsd eval`'s default)."""
        ...


# --- planning: what `dopsd plan` needs to know about a family, before anything is downloaded ---------------
# Each family's plan module exposes `plan_spec(model_cfg, hint=None) -> PlanSpec` (FamilyPlanModule; through
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
    resident: tuple[str, ...]  # parts on the device while it runs (as the adapter runs caching: one encoder at a time)
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
    # The adapter's own decode, on parts built by the planner: (parts, latents (B, …)) -> images; it makes the
    # same VAE calls as the adapter (its bounded batches included). None: the images are the latents.
    decode: Callable[[dict[str, nn.Module], torch.Tensor], Any] | None = None
    checks: Callable[[int, int], list[PlanCheck]] = lambda h, w: []
    denoiser: str = "transformer"
    sources: dict[str, str] = field(default_factory=dict)  # part -> where its configuration came from
    notes: list[str] = field(default_factory=list)


class FamilyPlanModule(Protocol):
    """What each family's plan module (dopsd.models.registry.PLAN_MODULES) defines."""

    def plan_spec(self, model_cfg: Any, hint: str | None = None) -> PlanSpec:
        """The family's full-size networks and calls as the trainer would run them for `model_cfg`, no weights.
        hint: free text that may name a variant when no local folder says which (e.g. a preset name)."""
        ...
