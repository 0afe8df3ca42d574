"""Adapter for the built-in miniature world (`dopsd.mini`): a CPU-sized turbo with an in-context encoder.

Latents are the pixels themselves, (B, 3, R, R) in [-1, 1] at the model's fixed resolution R (24). The
denoiser predicts x̂0; `velocity` returns v = (x − x̂0) / max(σ, σ_min), the project's convention.
Contexts are per-sample dicts: {"feats": (T, E), "feats_mask": (T,)} and, for the "reference" teacher path,
{"ref": (3, R, R), "ref_on": ()}. Teacher contexts:
  * "vlm"       – the target image goes through the frozen encoder with the caption (Z-Image + VLM style);
  * "reference" – caption-only features, plus the target's patches in the DiT's sequence (FLUX.2-klein style);
  * "text"      – caption only, no image (a control for probes and ablations).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from dopsd.errors import PromptError
from dopsd.mini import world
from dopsd.mini.nets import LORA_TARGETS, MiniConfig, MiniDiT, MiniEncoder, tiny_config
from dopsd.mini.recipe import RECIPE_VERSION
from dopsd.models.base import CaptionProblem, Context
from dopsd.models.local import ModelFolderError, read_safetensors
from dopsd.schedules import shifted_schedule

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEACHER_CONTEXTS = ("vlm", "reference", "text")


class MiniAdapter:
    name = "mini"

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
            from dopsd.config import ConfigError

            raise ConfigError(f"model.teacher_context must be one of {TEACHER_CONTEXTS} for the miniature, "
                              f"got {teacher_context!r}")
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
        out = []
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise TypeError(f"encode_images expects PIL images; item {i} is {type(img).__name__}")
            img = img.convert("RGB")
            if img.size != (res, res):  # the miniature has one fixed resolution
                img = img.resize((res, res), Image.Resampling.BOX if min(img.size) > res else Image.Resampling.BILINEAR)
            t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(res, res, 3)
            out.append(t.permute(2, 0, 1).float() / 127.5 - 1)
        return torch.stack(out).to(self.device, self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)

    def to_pil(self, images: torch.Tensor) -> list[Image.Image]:
        arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    def _check_size(self, height: int | None, width: int | None) -> None:
        res = self.cfg.res
        if (height is not None and height != res) or (width is not None and width != res):
            from dopsd.config import ConfigError

            raise ConfigError(f"the miniature model renders {res}×{res} only; got model.height×model.width = "
                              f"{height}×{width} (set both to {res})")

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        self._check_size(height, width)
        return (3, self.cfg.res, self.cfg.res)

    def inference_schedule(self, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        self._check_size(height, width)
        return shifted_schedule(steps or self.default_steps, self.cfg.shift)

    def default_lora_targets(self) -> list[str]:
        return default_lora_targets()

    def release_encoders(self) -> None:
        self.encoder = None

    # --- convenience for metrics, demo and tests --------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        captions: list[str],
        noise: torch.Tensor,
        steps: int | None = None,
        network: nn.Module | None = None,
        contexts: list[Context] | None = None,
    ) -> torch.Tensor:
        """Euler samples (B, 3, R, R) from `noise` with caption-only contexts (or the given ones)."""
        from dopsd.sampler import sample_euler

        net = network if network is not None else self.network
        ctx = self.collate(contexts if contexts is not None else self.student_contexts(captions))
        sched = self.inference_schedule(self.cfg.res, self.cfg.res, steps)
        return self.decode(sample_euler(lambda x, s, c: self.velocity(net, x, s, c), noise.to(self.device, self.dtype), sched, ctx))

    def noise(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, self.cfg.res, self.cfg.res, generator=g).to(self.device, self.dtype)


def caption_problems(cfg: Any, captions: list[str]) -> list[CaptionProblem]:
    """The family hook (dopsd.models.base): captions outside the fixed vocabulary or over MAX_TOKENS words."""
    found = [CaptionProblem(i, why) for i, c in enumerate(captions) if (why := world.caption_issue(c))]
    return found + [CaptionProblem(None, world.vocabulary_hint())] if found else []


def default_lora_targets() -> list[str]:
    """peft target names: every attention and MLP linear of the DiT blocks (not the embeddings/output)."""
    return list(LORA_TARGETS)


def weights_file(path: Path | str) -> Path:
    """A recipe folder means its turbo; a .safetensors file is itself."""
    path = Path(path)
    return path / "turbo.safetensors" if path.is_dir() else path


def read_weights(path: Path) -> tuple[MiniConfig, dict[str, torch.Tensor], dict, str]:
    """(config, state dict, manifest, kind) from a recipe folder or one of its .safetensors files."""
    file = weights_file(path)
    manifest_path = file.parent / "manifest.json"
    if not file.is_file() or not manifest_path.is_file():
        hint = (
            "the shipped weights are missing from the package: reinstall dopsd or rebuild them with "
            f"`dopsd mini recipe --out {WEIGHTS_DIR}`"
            if file.parent == WEIGHTS_DIR
            else "point pretrained at a folder written by `dopsd mini recipe --out DIR`, or use 'turbo'/'base'"
        )
        if (file.parent / "model_index.json").is_file():  # a diffusers folder: another family's weights
            hint = "it is a diffusers pipeline folder; set model.family (or the preset) to its family"
        raise ModelFolderError(f"model.pretrained: no miniature weights at {file} (with manifest.json beside it); {hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
        cfg = MiniConfig.from_dict(manifest["config"])
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ModelFolderError(f"model.pretrained: {manifest_path} is not a miniature manifest ({type(err).__name__}: "
                               f"{err}); rebuild the folder with `dopsd mini recipe --out DIR`") from None
    kind = "base" if file.stem == "base" else "turbo"
    state = read_safetensors(file, "model.pretrained", "rebuild it with `dopsd mini recipe --out DIR`")
    return cfg, state, manifest, kind


def build(cfg: MiniConfig, state: dict[str, torch.Tensor] | None = None) -> tuple[MiniDiT, MiniEncoder]:
    dit, enc = MiniDiT(cfg), MiniEncoder(cfg)
    if state is not None:
        dit.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("dit.")})
        enc.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
    return dit, enc


def build_from(path: Path) -> tuple[MiniConfig, MiniDiT, MiniEncoder, str]:
    """(config, DiT, encoder, kind) from recipe weights; weights that do not fit this network get a clear error."""
    cfg, state, manifest, kind = read_weights(path)
    version = manifest.get("recipe_version")
    if version is not None and version != RECIPE_VERSION:  # they may fit and still compute something else
        raise ModelFolderError(
            f"{weights_file(path)} was built by recipe {version}, this dopsd's miniature is {RECIPE_VERSION}. Rebuild "
            f"them with `dopsd mini recipe --out {weights_file(path).parent}` or use the shipped 'turbo'/'base'."
        )
    try:
        dit, enc = build(cfg, state)
    except RuntimeError as err:  # weights from another recipe version than this network
        raise ModelFolderError(
            f"{weights_file(path)} does not fit this version's miniature network (weights: "
            f"{manifest.get('recipe_version', 'unknown recipe')}, this dopsd: {RECIPE_VERSION}). Rebuild them with "
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


# --- planning (`dopsd plan`): the miniature's networks and calls, no weights ----------------------------------

def plan_spec(model_cfg: Any, hint: str | None = None):
    """The miniature as `dopsd plan` sees it (dopsd.models.base.PlanSpec); its config comes from the weights'
    manifest (the shipped turbo unless model.pretrained names other recipe weights)."""
    import dataclasses
    from types import SimpleNamespace

    from dopsd.models.base import PlanCall, PlanCheck, PlanSpec, PlanStage
    from dopsd.models.registry import torch_dtype
    from dopsd.schedules import training_schedule

    pretrained = getattr(model_cfg, "pretrained", None) or "turbo"
    path = WEIGHTS_DIR / f"{pretrained}.safetensors" if pretrained in ("turbo", "base") else Path(str(pretrained)).expanduser()
    manifest = weights_file(path).parent / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no miniature manifest at {manifest}; point model.pretrained at recipe weights")
    cfg = MiniConfig.from_dict(json.loads(manifest.read_text())["config"])
    kind = "base" if weights_file(path).stem == "base" else "turbo"
    dtype = torch_dtype(getattr(model_cfg, "dtype", None) or "float32")
    teacher_context = getattr(model_cfg, "teacher_context", None) or "vlm"
    res, t = cfg.res, cfg.max_tokens

    def latent_shape(h: int, w: int) -> tuple[int, ...]:
        if (h, w) != (res, res):
            raise ValueError(f"the miniature model renders {res}×{res} only; got {h}×{w}")
        return (3, res, res)

    def call(reference: bool):
        def make(h: int, w: int) -> PlanCall:
            def context(batch: int) -> dict[str, torch.Tensor]:
                ctx = {"feats": torch.zeros(batch, t, cfg.enc_dim, dtype=dtype),
                       "feats_mask": torch.ones(batch, t, dtype=torch.bool)}
                if reference:
                    ctx["ref"] = torch.zeros(batch, 3, res, res, dtype=dtype)
                    ctx["ref_on"] = torch.ones(batch, dtype=torch.bool)
                return ctx

            tokens = {"caption": t, "image": cfg.num_patches}
            if reference:
                tokens["reference"] = cfg.num_patches
            return PlanCall(context, tokens)

        return make

    def run(parts: dict[str, Any], height: int, width: int) -> Any:
        tokens = torch.zeros(8, t, dtype=torch.long)
        return parts["encoder"](tokens, torch.zeros(8, 3, res, res, dtype=dtype))

    steps = getattr(model_cfg, "inference_steps", None) or (cfg.base_steps if kind == "base" else cfg.turbo_steps)
    k = len(training_schedule(shifted_schedule(steps, cfg.shift), getattr(model_cfg, "rollout_every", 1) or 1)) - 1
    return PlanSpec(
        label=f"miniature ({pretrained})", dtype=dtype,
        parts={"transformer": lambda o: MiniDiT(dataclasses.replace(cfg, **o)), "encoder": lambda o: MiniEncoder(cfg)},
        depth={"layers": cfg.layers}, lora_targets=default_lora_targets(), latent_shape=latent_shape,
        student=call(False), teacher=call(teacher_context == "reference"),
        velocity=lambda net, x, s, c: MiniAdapter.velocity(SimpleNamespace(cfg=cfg), net, x, s, c),
        rollout_steps=k, caching=[PlanStage("caption features (mini encoder, 8 captions)", ("encoder",),
                                            ("transformer", "encoder"), run)],
        checks=lambda h, w: [PlanCheck("positions", True, f"learned positions for {cfg.num_patches} patches")],
        sources={"transformer": str(manifest), "encoder": str(manifest)},
        notes=["the miniature has no gradient checkpointing"],
    )
