"""Adapter for the built-in miniature world (`dopsd.mini`): a CPU-sized turbo with an in-context encoder, and
the miniature's family functions (dopsd.models.base.FamilyModule; the registry names this module by string).

Latents are the pixels themselves, (B, 3, R, R) in [-1, 1] at the model's fixed resolution R (24). The
denoiser predicts x̂0; `velocity` returns v = (x − x̂0) / max(σ, σ_min), the project's convention.
Contexts are per-sample dicts: {"feats": (T, E), "feats_mask": (T,)} and, for the "reference" teacher path,
{"ref": (3, R, R), "ref_on": ()}. Teacher contexts:
  * "vlm"       – the target image goes through the frozen encoder with the caption (Z-Image + VLM style);
  * "reference" – caption-only features, plus the target's patches in the DiT's sequence (FLUX.2-klein style);
  * "text"      – caption only, no image (a control for probes and ablations).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from dopsd.config import ConfigError
from dopsd.core.schedules import shifted_schedule
from dopsd.data.images import to_tensor
from dopsd.errors import PromptError
from dopsd.mini import world
from dopsd.mini.nets import LORA_TARGETS, MiniConfig, MiniDiT, MiniEncoder, build, tiny_config
from dopsd.mini.recipe_config import RECIPES
from dopsd.mini.scoring import MiniScorer, health_quality
from dopsd.models.base import BaseFacts, CaptionProblem, Context, LoraLayout, Pair, QualityFn
from dopsd.models.local import ModelFolderError, read_safetensors
from dopsd.models.quantize import plain, quantize_network

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEACHER_CONTEXTS = ("vlm", "reference", "text")
FACTS = BaseFacts("dopsd miniature", "dopsd-miniature", "dopsd_miniature")  # what its LoRA files say of the base


# The denoiser's repeated blocks: FSDP's units (train.fsdp), and what the planner's sharded figures count.
SHARD_BLOCKS = ("DiTBlock",)


class MiniAdapter:
    name = "mini"
    teacher_context_kinds = TEACHER_CONTEXTS[:2]  # "text" is the caption-only control
    lora_layout = None  # no other tool has this model: its LoRAs stay in dopsd's own peft layout
    pipeline_class = None
    shard_blocks = SHARD_BLOCKS

    def __init__(
        self,
        cfg: MiniConfig,
        network: MiniDiT,
        encoder: MiniEncoder,
        kind: str = "turbo",
        teacher_context: str = "vlm",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if teacher_context not in TEACHER_CONTEXTS:
            raise ConfigError(
                f"model.teacher_context must be one of {TEACHER_CONTEXTS} for the miniature, got {teacher_context!r}"
            )
        self.cfg = cfg
        self.kind = kind  # "turbo" (few steps), "base" (many steps) or "random"
        self.teacher_context = teacher_context
        self.device = torch.device(device)
        self.dtype = dtype
        self.network: nn.Module = network.to(self.device, dtype).eval()
        self.encoder: MiniEncoder | None = encoder.to(self.device, dtype).eval().requires_grad_(False)

    @property
    def resolution(self) -> int:
        return self.cfg.res

    @property
    def default_steps(self) -> int:
        return self.cfg.base_steps if self.kind == "base" else self.cfg.turbo_steps

    # --- denoising -------------------------------------------------------------------------------
    def velocity(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: Any) -> torch.Tensor:
        x0 = network(x, sigma, **context)
        s = sigma.to(x.dtype).clamp_min(self.cfg.sigma_min).reshape(-1, 1, 1, 1)
        return (x - x0) / s

    # --- contexts --------------------------------------------------------------------------------
    def _encoder(self) -> MiniEncoder:
        if self.encoder is None:
            raise RuntimeError("the mini encoder was released (release_encoders); build contexts before releasing it")
        return self.encoder

    @torch.no_grad()
    def _features(self, captions: list[str], images: torch.Tensor | None) -> list[Context]:
        # Every prompt path (training captions, sample/probe/eval prompts) comes through here: one clear error
        # for all unreadable prompts instead of the tokenizer's exception on the first.
        bad = [f"{c!r} {why}" for c in dict.fromkeys(captions) if (why := world.caption_issue(c))]
        if bad:
            lines = "\n".join(f"  - prompt {b}" for b in bad)
            raise PromptError(f"{len(bad)} prompt(s) the miniature cannot read:\n{lines}\n{world.vocabulary_hint()}")
        tokens = torch.stack([world.tokenize(c) for c in captions]).to(self.device)
        feats = self._encoder()(tokens, images)
        mask = tokens != 0
        return [{"feats": f, "feats_mask": m} for f, m in zip(feats, mask)]

    @staticmethod
    def _no_sources(sources: list[list[Image.Image]] | None) -> None:
        if sources is not None and any(len(s) for s in sources):
            raise ValueError("the miniature model is not an editing model: pass sources=None")

    def student_contexts(self, captions: list[str], sources: list[list[Image.Image]] | None = None) -> list[Context]:
        self._no_sources(sources)
        return self._features(list(captions), None)

    def teacher_contexts(
        self, captions: list[str], images: list[Image.Image], sources: list[list[Image.Image]] | None = None
    ) -> list[Context]:
        self._no_sources(sources)
        if len(captions) != len(images):
            raise ValueError(f"teacher_contexts got {len(captions)} captions for {len(images)} images")
        return self.teacher_contexts_from_tensors(list(captions), self.encode_images(images))

    def teacher_contexts_from_tensors(self, captions: list[str], images: torch.Tensor) -> list[Context]:
        """Teacher contexts from image tensors (B, 3, R, R) in [-1, 1] (the world renders tensors)."""
        images = images.to(self.device, self.dtype)
        if self.teacher_context == "text":
            return self._features(captions, None)
        if self.teacher_context == "vlm":
            return self._features(captions, images)
        contexts = self._features(captions, None)
        on = torch.tensor(True, device=self.device)
        return [dict(c, ref=img, ref_on=on) for c, img in zip(contexts, images)]

    def collate(self, contexts: list[Context]) -> dict[str, torch.Tensor]:
        if not contexts:
            raise ValueError("collate got no contexts")
        out = {
            "feats": torch.stack([c["feats"] for c in contexts]).to(self.device, self.dtype),
            "feats_mask": torch.stack([c["feats_mask"] for c in contexts]).to(self.device),
        }
        if any("ref" in c for c in contexts):  # mixed batches: absent references are masked out
            blank = torch.zeros(3, self.cfg.res, self.cfg.res)
            out["ref"] = torch.stack([c.get("ref", blank).to(self.device, self.dtype) for c in contexts])
            out["ref_on"] = torch.stack(
                [torch.as_tensor(c.get("ref_on", False), device=self.device).bool() for c in contexts]
            )
        return out

    # --- images ----------------------------------------------------------------------------------
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        res = self.cfg.res
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise TypeError(f"encode_images expects PIL images; item {i} is {type(img).__name__}")

        def fit(img: Image.Image) -> Image.Image:  # the miniature has one fixed resolution
            img = img.convert("RGB")
            if img.size == (res, res):
                return img
            return img.resize((res, res), Image.Resampling.BOX if min(img.size) > res else Image.Resampling.BILINEAR)

        return to_tensor([fit(img) for img in images]).to(self.device, self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)

    def _check_size(self, height: int | None, width: int | None) -> None:
        res = self.cfg.res
        if (height is not None and height != res) or (width is not None and width != res):
            raise ConfigError(
                f"the miniature model renders {res}×{res} only; got model.height×model.width = "
                f"{height}×{width} (set both to {res})"
            )

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        self._check_size(height, width)
        return (3, self.cfg.res, self.cfg.res)

    def inference_schedule(self, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        self._check_size(height, width)
        return shifted_schedule(steps or self.default_steps, self.cfg.shift)

    def default_lora_targets(self) -> list[str]:
        return default_lora_targets()

    def check_lora_targets(self, modules: list[str]) -> None:
        """Nothing to check: the miniature's LoRA files are dopsd's own (any targets load back)."""

    def release_encoders(self) -> None:
        self.encoder = None

    def cache_fingerprint(self) -> dict[str, Any]:
        """The weights themselves (small enough to hash): recipe folders can be rebuilt in place, and tests and the
        bench change networks without changing the config; and the teacher path, which the bench and tests set on
        the adapter."""
        h = hashlib.sha256()
        for part in (self.encoder, self.network):
            for key, t in part.state_dict().items() if part is not None else ():
                h.update(key.encode())  # a quantized base (model.quantize) by its dequantized values
                h.update(plain(t.detach()).cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return {"kind": self.kind, "weights": h.hexdigest(), "teacher_context": self.teacher_context}

    # --- hooks of the probe, health and eval ---------------------------------------------------------
    def health_quality(self, prompts: list[str]) -> QualityFn | None:
        return health_quality(prompts)

    def probe_scorer(self) -> Any:
        return MiniScorer()

    def unseen_prompts(self, trigger_word: str) -> list[str]:
        """The concept on shapes and backgrounds that the built-in concept datasets leave out."""
        shapes = [s for i, s in enumerate(world.SHAPES) if i not in world.CONCEPT_TRAIN_SHAPES]
        backgrounds = [b for b in world.BACKGROUNDS if b not in world.CONCEPT_TRAIN_BACKGROUNDS]
        return [f"a {trigger_word} {s} on a {b} background" for s in shapes for b in backgrounds]


def caption_problems(cfg: Any, captions: list[str]) -> list[CaptionProblem]:
    """The family hook (dopsd.models.base): captions outside the fixed vocabulary or over MAX_TOKENS words."""
    found = [CaptionProblem(i, why) for i, c in enumerate(captions) if (why := world.caption_issue(c))]
    return found + [CaptionProblem(None, world.vocabulary_hint())] if found else []


def check_teacher_folder(cfg: Any) -> None:
    """The family hook (dopsd.models.base): the miniature's teacher contexts need no other folder."""


def default_lora_targets() -> list[str]:
    """peft target names: every attention and MLP linear of the DiT blocks (not the embeddings/output)."""
    return list(LORA_TARGETS)


def weights_file(path: Path | str) -> Path:
    """A recipe folder means its turbo; a .safetensors file is itself."""
    path = Path(path)
    return path / "turbo.safetensors" if path.is_dir() else path


def read_weights(path: Path, field: str = "model.pretrained") -> tuple[MiniConfig, dict[str, torch.Tensor], dict, str]:
    """(config, state dict, manifest, kind) from a recipe folder or one of its .safetensors files; errors name
    `field`, the option that gave the path."""
    file = weights_file(path)
    manifest_path = file.parent / "manifest.json"
    if not file.is_file() or not manifest_path.is_file():
        hint = (
            "the shipped weights are missing from the package: reinstall dopsd or rebuild them with "
            f"`dopsd mini recipe --out {WEIGHTS_DIR}`"
            if file.parent == WEIGHTS_DIR
            else "give a folder written by `dopsd mini recipe --out DIR` (or one of its files), or 'turbo'/'base'"
        )
        if (file.parent / "model_index.json").is_file():  # a diffusers folder: another family's weights
            hint = "it is a diffusers pipeline folder; set model.family (or the preset) to its family"
        raise ModelFolderError(f"{field}: no miniature weights at {file} (with manifest.json beside it); {hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
        cfg = MiniConfig.from_dict(manifest["config"])
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ModelFolderError(
            f"{field}: {manifest_path} is not a miniature manifest ({type(err).__name__}: "
            f"{err}); rebuild the folder with `dopsd mini recipe --out DIR`"
        ) from None
    kind = "base" if file.stem == "base" else "turbo"
    state = read_safetensors(file, field, "rebuild it with `dopsd mini recipe --out DIR`")
    return cfg, state, manifest, kind


def build_from(path: Path, field: str = "model.pretrained") -> tuple[MiniConfig, MiniDiT, MiniEncoder, str]:
    """(config, DiT, encoder, kind) from recipe weights; weights that do not fit this network get a clear error
    (naming `field`, the option that gave the path)."""
    cfg, state, manifest, kind = read_weights(path, field)
    version = manifest.get("recipe_version")
    if version is not None and version not in RECIPES:  # they may fit and still compute something else
        raise ModelFolderError(
            f"{weights_file(path)} was built by recipe {version}, this dopsd's miniature reads {', '.join(RECIPES)}. "
            f"Rebuild them with `dopsd mini recipe --out {weights_file(path).parent}` or use the shipped "
            "'turbo'/'base'."
        )
    try:
        dit, enc = build(cfg, state)
    except RuntimeError as err:  # weights from another recipe version than this network
        raise ModelFolderError(
            f"{weights_file(path)} does not fit this version's miniature network (weights: "
            f"{manifest.get('recipe_version', 'unknown recipe')}, this dopsd: {', '.join(RECIPES)}). Rebuild them with "
            f"`dopsd mini recipe --out {weights_file(path).parent}` or use the shipped 'turbo'/'base'. Detail: {str(err)[:300]}"
        ) from None
    return cfg, dit, enc, kind


def load(cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> MiniAdapter:
    """Factory: cfg.pretrained None|'turbo' (shipped turbo), 'base' (shipped base) or a recipe folder/file."""
    pretrained = getattr(cfg, "pretrained", None) or "turbo"
    teacher_context = getattr(cfg, "teacher_context", None) or "vlm"
    if pretrained in ("turbo", "base"):
        path = WEIGHTS_DIR / f"{pretrained}.safetensors"
    else:
        path = Path(str(pretrained)).expanduser()
    mcfg, dit, enc, kind = build_from(path)
    adapter = MiniAdapter(mcfg, dit, enc, kind=kind, teacher_context=teacher_context, device=device, dtype=dtype)
    adapter._check_size(getattr(cfg, "height", None), getattr(cfg, "width", None))

    report = quantize_network(adapter.network, getattr(cfg, "quantize", "none"), device=device)
    if report.mode != "none":
        print(f"[dopsd] {report}")
    return adapter


def tiny_random_adapter(seed: int = 0, teacher_context: str = "vlm") -> MiniAdapter:
    """A tiny randomly initialised adapter (every weight non-zero, so LoRA gradients flow) for fast tests."""
    torch.manual_seed(seed)
    cfg = tiny_config()
    dit, enc = build(cfg)
    with torch.no_grad():
        for p in list(dit.parameters()) + list(enc.parameters()):
            if not p.abs().sum():  # zero-initialised gates/outputs would make the blocks inert
                p.normal_(0.0, 0.05)
    return MiniAdapter(cfg, dit, enc, kind="random", teacher_context=teacher_context)


# --- the family's other module-level functions (dopsd.models.base.FamilyModule) --------------------------------


def lora_layout() -> LoraLayout | None:
    return None


def owns_network(network: nn.Module) -> bool:
    return any(isinstance(m, MiniDiT) for m in network.modules())


def base_facts(network: nn.Module | None = None, lora: dict[str, Pair] | None = None) -> BaseFacts:
    return FACTS


def example_dataset(folder: Path) -> list[str]:
    """The miniature's held-out concept dataset (captions use `sks`) in `folder`; its captions."""
    return world.write_concept_dataset(folder)
