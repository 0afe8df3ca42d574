"""Z-Image-Turbo (diffusers `ZImagePipeline`) behind the `ModelAdapter` protocol, and every Z-Image fact the rest
of dopsd needs (LoRA interchange layout, published sizes, caption limits).

Conventions translated here (pinned by tests against the pipeline itself):
  * the transformer takes *lists*: latents (C, 1, H, W) per sample and caption features (L_i, D) with
    padding removed;
  * its timestep is 1 − σ (0 = pure noise), and it predicts x0 − ε: the velocity is the *negated* output;
  * student text features: Qwen3 chat template (thinking enabled), hidden_states[-2], padding removed;
  * teacher ("vlm"): the same layer of a Qwen3-VL carrying the text encoder's weights, over
    image tokens then the caption (see `dopsd.models.qwen_vl`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from PIL import Image
from torch import nn

from dopsd.config import ConfigError
from dopsd.core.schedules import dynamic_schedule, shifted_schedule
from dopsd.models.base import BaseFacts, CaptionProblem, Context, LoraLayout, Pair
from dopsd.models.hooks import DiffusersHooks
from dopsd.models.local import (
    ModelFolderError,
    chat_token_counts,
    chat_tokens,
    check_pipeline_folder,
    check_size,
    load_denoiser,
    load_part,
    part_config,
    read_json,
    resolve_dtype,
    stack_or_list,
    still_loaded,
    to_pixels,
    token_limit_problems,
)
from dopsd.models.qwen_vl import QwenVLEncoder, check_vlm_folder

LABEL = "Z-Image-Turbo"
STEPS = 8  # Turbo's own few-step setting
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
TEACHER_CONTEXTS = ("vlm",)  # "text" is accepted as well: a caption-only control
# Left unquantized under model.quantize: the input/output projections and the timestep and caption embedders
# (small next to the blocks, and what every token passes through first or last).
QUANTIZE_SKIP = ("t_embedder", "all_x_embedder", "cap_embedder", "all_final_layer")

# The interchange layout is diffusers' own module names: ComfyUI's Z-Image key map accepts them (slicing to_q/to_k/
# to_v into its fused qkv) and diffusers strips the prefix. Only modules both tools map are listed.
LORA_LAYOUT = LoraLayout(
    rows=tuple(
        (name, name, None)
        for name in (
            "{blk}.{i}.attention.to_q",
            "{blk}.{i}.attention.to_k",
            "{blk}.{i}.attention.to_v",
            "{blk}.{i}.attention.to_out.0",
            "{blk}.{i}.feed_forward.w1",
            "{blk}.{i}.feed_forward.w2",
            "{blk}.{i}.feed_forward.w3",
            "{blk}.{i}.adaLN_modulation.0",
            "all_x_embedder.2-1",
            "all_final_layer.2-1.linear",
            "all_final_layer.2-1.adaLN_modulation.1",
            "cap_embedder.1",
            "t_embedder.mlp.0",
            "t_embedder.mlp.2",
        )
    ),
    placeholders=(("i", r"\d+"), ("blk", "layers|noise_refiner|context_refiner")),
    sign=r"(^|\.)(layers|noise_refiner|context_refiner)\.\d+\.",
    implementation="diffusers",
)
# The VAE decodes at most this many pixels per call (at least one image): its decoder holds about 1.5 GiB of
# activations per 1024² image in bf16 (`dopsd plan`), so eight decoded at once needed ~12 GiB beside training.
DECODE_PIXELS = 1024 * 1024
# Published transformer sizes (layers, width) → (variant, modelspec architecture, ss_base_model_version).
VARIANTS = {(30, 3840): ("Z-Image 6B", "Z-Image", "z_image")}


# The denoiser's repeated blocks: FSDP's units (train.fsdp), and what the planner's sharded figures count.
SHARD_BLOCKS = ("ZImageTransformerBlock",)


class ZImageAdapter(DiffusersHooks):
    label = LABEL
    name = "zimage"
    kind = None
    teacher_context_kinds = TEACHER_CONTEXTS
    shard_blocks = SHARD_BLOCKS
    lora_layout = LORA_LAYOUT
    layers = (-2,)  # the text encoder's second-to-last hidden layer (as ZImagePipeline)
    pipeline_name = "ZImagePipeline"

    def __init__(self, cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None):
        from diffusers import AutoencoderKL, ZImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen3Model

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.folder = check_pipeline_folder(cfg.pretrained, "zimage")
        self.teacher_context = cfg.teacher_context
        if self.teacher_context not in (*TEACHER_CONTEXTS, "text"):
            raise ConfigError(
                f"model.teacher_context={self.teacher_context!r} is not available for Z-Image-Turbo: it has no "
                "reference-image input; use 'vlm' (or 'text' for a caption-only teacher)"
            )
        if cfg.editing:
            raise ConfigError(
                "model.editing is a FLUX.2-klein mode; Z-Image-Turbo has no editing path: set it to false"
            )
        self.transformer_config = part_config(ZImageTransformer2DModel, self.folder, "transformer")
        self.vae = load_part(AutoencoderKL, self.folder, "vae", self.dtype).to(self.device).eval().requires_grad_(False)
        self.text_encoder = load_part(Qwen3Model, self.folder, "text_encoder", self.dtype).to(self.device).eval()
        self.text_encoder.requires_grad_(False)
        self.tokenizer = load_part(AutoTokenizer, self.folder, "tokenizer")
        self.scheduler_config = read_json(self.folder / "scheduler" / "scheduler_config.json")
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.steps = cfg.inference_steps if cfg.inference_steps is not None else STEPS
        self.caption_limit = caption_limit(self.transformer_config["axes_lens"])
        self.max_tokens = min(cfg.max_caption_tokens, self.caption_limit)
        self.teacher_max_tokens = min(cfg.teacher_max_tokens, self.caption_limit)
        self._vlm = None

    # --- the denoiser -----------------------------------------------------------------------------

    @property
    def network(self) -> nn.Module:
        """The transformer, loaded (and quantized, model.quantize) on first use: after the feature cache."""
        if self._network is None:
            from diffusers import ZImageTransformer2DModel

            network = load_denoiser(
                ZImageTransformer2DModel, self.folder, self.dtype, self.device, self.cfg.quantize, QUANTIZE_SKIP
            )
            for name in ("x_pad_token", "cap_pad_token"):
                token = getattr(network, name, None)
                if token is not None and not torch.isfinite(token).all():
                    raise ModelFolderError(
                        f"model.pretrained: {self.folder}/transformer: {name} is not finite; the "
                        "checkpoint is incomplete: download it again"
                    )
            self._network = network
        return self._network

    @network.setter
    def network(self, value: nn.Module) -> None:
        self._network = value

    def velocity(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: Any) -> torch.Tensor:
        """v = ε − x0 = −(model output), with the model's timestep 1 − σ (same arithmetic as the pipeline)."""
        t = (1000 - sigma.float() * 1000) / 1000  # float32 like the pipeline: the model embeds it before casting
        latents = list(x.to(self.dtype).unsqueeze(2).unbind(0))
        out = network(latents, t, context["cap_feats"], return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2).to(x.dtype)

    # --- contexts ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _text_features(self, captions: list[str]) -> list[torch.Tensor]:
        tokenizer = still_loaded(self.tokenizer, "tokenizer")
        encoder = self._only_on_device(still_loaded(self.text_encoder, "text encoder"))
        ids, mask = chat_tokens(tokenizer, captions, self.max_tokens, thinking=True, device=self.device)
        mask = mask.bool()
        hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [h[m].cpu() for h, m in zip(hidden, mask)]

    def student_contexts(self, captions: list[str], sources: list[list[Image.Image]] | None = None) -> list[Context]:
        if sources is not None and any(sources):
            raise ValueError("Z-Image-Turbo has no source-image input (editing is FLUX.2-klein only)")
        return [{"cap_feats": f} for f in self._text_features(captions)]

    def vlm(self):
        """The Qwen3-VL teacher encoder with Z-Image's text-encoder weights (built on first use)."""
        if self._vlm is None:
            text_encoder = still_loaded(self.text_encoder, "text encoder")
            self._only_on_device(None)  # the text encoder waits on the CPU while the VLM loads and runs
            self._vlm = QwenVLEncoder(
                self.cfg.teacher_encoder,
                text_encoder,
                self.device,
                self.dtype,
                image_tokens=self.cfg.teacher_image_tokens,
            )
            print(f"[dopsd] VLM teacher: {self._vlm.report}")
        self._only_on_device(self._vlm.model)
        return self._vlm

    @torch.no_grad()
    def teacher_contexts(
        self, captions: list[str], images: list[Image.Image], sources: list[list[Image.Image]] | None = None
    ) -> list[Context]:
        if sources is not None and any(sources):
            raise ValueError("Z-Image-Turbo has no source-image input (editing is FLUX.2-klein only)")
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images")
        if self.teacher_context == "text":
            return self.student_contexts(captions)
        vlm = self.vlm()
        return [
            {"cap_feats": vlm.encode(im, c, layers=(-2,), max_tokens=self.teacher_max_tokens).cpu()}
            for c, im in zip(captions, images)
        ]

    def collate(self, contexts: list[Context]) -> dict[str, list[torch.Tensor]]:
        return {"cap_feats": [c["cap_feats"].to(self.device, self.dtype) for c in contexts]}

    # --- latents ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor | list[torch.Tensor]:
        """Clean latents at each image's own size (floored to a multiple of 2·VAE scale), normalised like the
        pipeline: (z − shift) · scale. One tensor if the sizes agree, else one per image."""
        out = []
        for im in images:
            pixels = to_pixels(im, self.vae_scale * 2).to(self.device, self.vae.dtype)
            z = self.vae.encode(pixels).latent_dist.mode()
            out.append(((z - self.vae.config.shift_factor) * self.vae.config.scaling_factor).float())
        return stack_or_list(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], decoded DECODE_PIXELS at a time (dopsd.models.zimage_plan runs this same code)."""
        z = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        per = max(1, DECODE_PIXELS // (z.shape[-2] * z.shape[-1] * self.vae_scale**2))
        return torch.cat([self.vae.decode(c, return_dict=False)[0].float().clamp(-1, 1) for c in z.split(per)])

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        multiple = self.vae_scale * 2
        check_size(height, width, multiple, "Z-Image")
        return (int(self.transformer_config["in_channels"]), height // self.vae_scale, width // self.vae_scale)

    def inference_schedule(self, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        steps = steps or self.steps
        sc, shift = self.scheduler_config, self.cfg.shift
        if shift is not None or not sc.get("use_dynamic_shifting", False):
            return shifted_schedule(steps, float(shift if shift is not None else sc.get("shift", 3.0)))
        # Dynamic shifting (not Turbo's setting): the pipeline's linear μ in the image token count.
        seq = (height // self.vae_scale // 2) * (width // self.vae_scale // 2)
        base, top = sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096)
        lo, hi = sc.get("base_shift", 0.5), sc.get("max_shift", 1.15)
        return dynamic_schedule(steps, lo + (hi - lo) * (seq - base) / (top - base))

    def default_lora_targets(self) -> list[str]:
        return list(LORA_TARGETS)


def caption_limit(axes_lens: list[int]) -> int:
    """Captions are padded to a multiple of 32 and the image's first RoPE index sits right after them, so a
    caption may not exceed axes_lens[0] − 32 tokens (992 for an axis of 1024): longer ones index past RoPE."""
    return (int(axes_lens[0]) - 2) // 32 * 32


# --- the family's module-level functions (dopsd.models.base.FamilyModule) -------------------------------------


def load(cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> ZImageAdapter:
    return ZImageAdapter(cfg, device, dtype)


def caption_problems(cfg: Any, captions: list[str]) -> list[CaptionProblem]:
    """Captions the text encoder will cut, counted with the folder's own tokenizer and chat template (only the
    tokenizer and the transformer's config are read)."""
    from transformers import AutoTokenizer

    folder = check_pipeline_folder(cfg.pretrained, "zimage")
    most = caption_limit(read_json(folder / "transformer" / "config.json").get("axes_lens", [1024]))
    limit = min(cfg.max_caption_tokens, most)
    counts = chat_token_counts(load_part(AutoTokenizer, folder, "tokenizer"), captions, thinking=True)
    found = token_limit_problems(counts, limit, "model.max_caption_tokens")
    hint = f"shorten them, or raise model.max_caption_tokens (this Z-Image reads at most {most} caption tokens)"
    return found + [CaptionProblem(None, hint, notice=True)] if found else []


def check_teacher_folder(cfg: Any) -> None:
    """The VLM teacher's Qwen3-VL folder (model.teacher_encoder), checked before the pipeline's parts load."""
    if cfg.teacher_context == "vlm":
        check_vlm_folder(cfg.teacher_encoder)


def lora_layout() -> LoraLayout:
    return LORA_LAYOUT


def owns_network(network: nn.Module) -> bool:
    return any(type(m).__name__.startswith("ZImageTransformer") for m in network.modules())


def base_facts(network: nn.Module | None = None, lora: Mapping[str, Pair] | None = None) -> BaseFacts | None:
    """From the transformer's config (layers, width), else from a LoRA's shapes (blocks trained, q width)."""
    size = None
    if network is not None:
        try:
            size = (int(network.config.n_layers), int(network.config.dim))
        except AttributeError:
            size = None
    elif lora:
        width = next((a.shape[1] for m, (a, _) in lora.items() if m.endswith("attention.to_q")), None)
        ids = [int(m.split(".")[1]) for m in lora if m.startswith("layers.") and m.split(".")[1].isdigit()]
        size = (max(ids) + 1 if ids else 0, int(width)) if width is not None else None
    if size is None:
        return None
    known = VARIANTS.get(size)
    return BaseFacts(
        *(known or (f"Z-Image ({size[0]} layers, width {size[1]}; not a published size)", "Z-Image", "z_image"))
    )


def example_dataset(folder: Any) -> None:
    """No dataset ships with this family (the miniature's does)."""
    return None
