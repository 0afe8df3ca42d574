"""FLUX.2-klein (diffusers `Flux2KleinPipeline`) behind the `ModelAdapter` protocol, with the family's module-level
functions; its weight-free facts (schedule, LoRA layout, published sizes, teacher instructions) are in
dopsd.models.flux2_facts.

Conventions translated here (pinned by tests against the pipeline itself):
  * latents are the VAE's, 2×2-patchified and normalised with the VAE's batch-norm statistics, kept as
    (4C, h, w) per sample; `velocity` packs them to tokens (h·w, 4C) with 4-D position ids (T, H, W, L);
  * the timestep is σ itself and the output is already the velocity (no negation);
  * text: Qwen3 chat template (thinking disabled), padded to a fixed length and attended in full,
    hidden layers 9/18/27 concatenated per token;
  * reference images (teacher "reference" and editing) are encoded like the latents, packed, given ids
    with T = 10, 20, … and appended *after* the noisy tokens; the output is sliced back to the noisy ones.
    Only the ids of sample 0 are used by the model, so a batch must share reference shapes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from PIL import Image
from torch import nn

from dopsd.config import ConfigError
from dopsd.models.base import BaseFacts, CaptionProblem, Context, LoraLayout, Pair
from dopsd.models.flux2_facts import (
    LORA_LAYOUT,
    LORA_TARGETS,
    QUANTIZE_SKIP,
    STEPS,
    VARIANTS,
    flux2_schedule,
    position_ids,
    teacher_instruction,
    transformer_size,
    with_instruction,
)
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
    resolve_dtype,
    stack_or_list,
    still_loaded,
    to_pixels,
    token_limit_problems,
)
from dopsd.models.qwen_vl import QwenVLEncoder

LABEL = "FLUX.2-klein"
TEXT_LAYERS = (9, 18, 27)  # Qwen3 hidden states concatenated per token, as the pipeline
TEACHER_CONTEXTS = ("reference", "vlm")  # "text" is accepted as well: a caption-only control
# The VAE decodes at most this many pixels per call (at least one image): its decoder holds about 1.5 GiB of
# activations per 1024² image in bf16 (`dopsd plan`), so eight decoded at once needed ~12 GiB beside training.
DECODE_PIXELS = 1024 * 1024


# The denoiser's repeated blocks: FSDP's units (train.fsdp), and what the planner's sharded figures count.
SHARD_BLOCKS = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")


class Flux2Adapter(DiffusersHooks):
    label = LABEL
    name = "flux2"
    kind = None
    teacher_context_kinds = TEACHER_CONTEXTS
    shard_blocks = SHARD_BLOCKS
    lora_layout = LORA_LAYOUT
    pipeline_name = "Flux2KleinPipeline"
    pipeline_kwargs = {"is_distilled": True}

    def __init__(self, cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None):
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import AutoTokenizer, Qwen3Model

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.folder = check_pipeline_folder(cfg.pretrained, "flux2")
        self.teacher_context = cfg.teacher_context
        if self.teacher_context not in (*TEACHER_CONTEXTS, "text"):
            raise ConfigError(
                f"model.teacher_context must be 'reference', 'vlm' or 'text' for FLUX.2, got {self.teacher_context!r}"
            )
        self.editing = bool(cfg.editing)
        if self.editing and self.teacher_context != "reference":
            raise ConfigError("model.editing trains through the reference path: set model.teacher_context: reference")
        self.instruction = teacher_instruction(cfg)
        self.transformer_config = part_config(Flux2Transformer2DModel, self.folder, "transformer")
        self.vae = (
            load_part(AutoencoderKLFlux2, self.folder, "vae", self.dtype).to(self.device).eval().requires_grad_(False)
        )
        # The bare Qwen3 (the same hidden states): the folder's Qwen3ForCausalLM adds an lm_head that only makes
        # logits, which the features never read (1.16 GiB in klein 9B's bf16), so it is left on disk.
        encoder = load_part(Qwen3Model, self.folder, "text_encoder", self.dtype, quiet=True)
        self.text_encoder = encoder.to(self.device).eval()
        self.text_encoder.requires_grad_(False)
        self.tokenizer = load_part(AutoTokenizer, self.folder, "tokenizer")
        self.layers = tuple(cfg.text_encoder_out_layers or TEXT_LAYERS)
        depth = self.text_encoder.config.num_hidden_layers
        if max(self.layers) > depth:
            raise ModelFolderError(
                f"model.pretrained: text_encoder_out_layers {self.layers} exceed the {depth} layers of "
                f"{self.folder}/text_encoder; is this the FLUX.2-klein text encoder?"
            )
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.steps = cfg.inference_steps if cfg.inference_steps is not None else STEPS
        self.max_tokens = cfg.max_caption_tokens
        self.teacher_max_tokens = cfg.teacher_max_tokens
        bn = self.vae.bn
        self.bn_mean = bn.running_mean.detach().float().view(1, -1, 1, 1).to(self.device)
        self.bn_std = (
            torch.sqrt(bn.running_var.detach().float() + self.vae.config.batch_norm_eps)
            .view(1, -1, 1, 1)
            .to(self.device)
        )
        self._vlm = None

    # --- the denoiser -----------------------------------------------------------------------------

    @property
    def network(self) -> nn.Module:
        """The transformer, loaded (and quantized, model.quantize) on first use: after the feature cache."""
        if self._network is None:
            from diffusers import Flux2Transformer2DModel

            self._network = load_denoiser(
                Flux2Transformer2DModel, self.folder, self.dtype, self.device, self.cfg.quantize, QUANTIZE_SKIP
            )
        return self._network

    @network.setter
    def network(self, value: nn.Module) -> None:
        self._network = value

    def velocity(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: Any) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1)
        img_ids = position_ids(0, h, w).to(x.device)
        refs = context.get("ref_tokens")
        if refs is not None:
            tokens = torch.cat([tokens, refs.to(tokens.dtype)], dim=1)
            img_ids = torch.cat([img_ids, context["ref_ids"]], dim=0)
        t = (sigma.float() * 1000) / 1000  # the pipeline's arithmetic: timestep σ·1000, passed as /1000
        out = network(
            hidden_states=tokens.to(self.dtype),
            encoder_hidden_states=context["prompt_embeds"],
            timestep=t.to(self.dtype),
            img_ids=img_ids,
            txt_ids=context["txt_ids"],
            guidance=None,
            return_dict=False,
        )[0]
        return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w).to(x.dtype)

    # --- contexts ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _text_features(self, captions: list[str]) -> list[torch.Tensor]:
        tokenizer = still_loaded(self.tokenizer, "tokenizer")
        encoder = self._only_on_device(still_loaded(self.text_encoder, "text encoder"))
        ids, mask = chat_tokens(tokenizer, captions, self.max_tokens, thinking=False, device=self.device)
        out = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        feats = torch.cat([out.hidden_states[k] for k in self.layers], dim=-1)
        return [f.cpu() for f in feats]

    @torch.no_grad()
    def _reference_tokens(self, refs: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed tokens (M, 4C) and ids (M, 4) of reference images, T = 10, 20, … in order."""
        latents = self.encode_images(refs)
        tokens, ids = [], []
        for i, lat in enumerate(latents):  # references may differ in size: ids carry each one's grid
            c, h, w = lat.shape
            tokens.append(lat.reshape(c, h * w).t())
            ids.append(position_ids(10 * (i + 1), h, w))
        return torch.cat(tokens).cpu(), torch.cat(ids)

    def _contexts(self, captions: list[str], refs: list[list[Image.Image]] | None) -> list[Context]:
        feats = self._text_features(captions)
        out: list[Context] = []
        for i, f in enumerate(feats):
            ctx: Context = {"prompt_embeds": f}
            if refs is not None and refs[i]:
                ctx["ref_tokens"], ctx["ref_ids"] = self._reference_tokens(refs[i])
            out.append(ctx)
        return out

    def student_contexts(self, captions: list[str], sources: list[list[Image.Image]] | None = None) -> list[Context]:
        """Editing: instruction + source references; sources=None (e.g. sample prompts) gives plain text-to-image."""
        if self.editing and sources is not None and not all(sources):
            raise ValueError("model.editing: every training pair needs at least one source image")
        return self._contexts(captions, sources if self.editing else None)

    def teacher_contexts(
        self, captions: list[str], images: list[Image.Image], sources: list[list[Image.Image]] | None = None
    ) -> list[Context]:
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images")
        if self.teacher_context == "text":
            return self.student_contexts(captions, sources)
        if self.teacher_context == "vlm":
            return self._vlm_contexts(captions, images)
        joined = with_instruction(captions, self.instruction)
        if self.editing:
            if sources is None or not all(sources):
                raise ValueError("model.editing: every training pair needs at least one source image")
            return self._contexts(joined, [list(s) + [im] for s, im in zip(sources, images)])
        return self._contexts(joined, [[im] for im in images])

    @torch.no_grad()
    def _vlm_contexts(self, captions: list[str], images: list[Image.Image]) -> list[Context]:
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
        return [
            {"prompt_embeds": self._vlm.encode(im, c, self.layers, pad_to=self.teacher_max_tokens).cpu()}
            for c, im in zip(captions, images)
        ]

    def collate(self, contexts: list[Context]) -> dict[str, torch.Tensor]:
        shapes = {tuple(c["prompt_embeds"].shape) for c in contexts}
        if len(shapes) != 1:
            raise ValueError(f"FLUX.2 contexts in one batch must share their text length, got {sorted(shapes)}")
        embeds = torch.stack([c["prompt_embeds"] for c in contexts]).to(self.device, self.dtype)
        zero = torch.zeros(1, dtype=torch.long)  # text ids: T = H = W = 0, L = token index
        txt_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(embeds.shape[1])).to(self.device)
        batch: dict[str, torch.Tensor] = {"prompt_embeds": embeds, "txt_ids": txt_ids}
        with_refs = ["ref_tokens" in c for c in contexts]
        if any(with_refs):
            ids = contexts[0].get("ref_ids")
            if not all(with_refs) or any(not torch.equal(c["ref_ids"], ids) for c in contexts):
                raise ValueError(
                    "FLUX.2 uses one set of position ids per batch: all samples need the same number and size of "
                    "reference images (batch such pairs together or use batch size 1)"
                )
            batch["ref_tokens"] = torch.stack([c["ref_tokens"] for c in contexts]).to(self.device, self.dtype)
            batch["ref_ids"] = ids.to(self.device)
        return batch

    # --- latents ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor | list[torch.Tensor]:
        """Clean latents at each image's own size (floored to a multiple of 2·VAE scale): VAE mode, 2×2
        patchify, batch-norm normalisation, like the pipeline. One tensor if the sizes agree, else one per image."""
        out = []
        for im in images:
            pixels = to_pixels(im, self.vae_scale * 2).to(self.device, self.vae.dtype)
            lat = self.vae.encode(pixels).latent_dist.mode().float()
            b, c, h, w = lat.shape  # patchify 2×2 like the pipeline: channel-major, then (dy, dx)
            lat = lat.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
            out.append((lat - self.bn_mean) / self.bn_std)
        return stack_or_list(out)

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation and the 2×2 patchify: what the pipeline returns for output_type='latent'."""
        lat = latents.to(self.device).float() * self.bn_std + self.bn_mean
        b, c4, h, w = lat.shape
        return lat.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], decoded DECODE_PIXELS at a time (dopsd.models.flux2_plan runs this same code)."""
        lat = self.to_vae_latents(latents).to(self.vae.dtype)
        per = max(1, DECODE_PIXELS // (lat.shape[-2] * lat.shape[-1] * self.vae_scale**2))
        return torch.cat([self.vae.decode(c, return_dict=False)[0].float().clamp(-1, 1) for c in lat.split(per)])

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        multiple = self.vae_scale * 2
        check_size(height, width, multiple, "FLUX.2")
        return (int(self.transformer_config["in_channels"]), height // multiple, width // multiple)

    def inference_schedule(self, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        _, h, w = self.latent_shape(height, width)
        return flux2_schedule(steps or self.steps, h * w)

    def default_lora_targets(self) -> str:
        return LORA_TARGETS


# --- the family's module-level functions (dopsd.models.base.FamilyModule) -------------------------------------


def load(cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> Flux2Adapter:
    return Flux2Adapter(cfg, device, dtype)


def check_teacher_folder(cfg: Any) -> None:
    """The reference-image teacher reads the pipeline folder's own parts: nothing else to check."""


def caption_problems(cfg: Any, captions: list[str]) -> list[CaptionProblem]:
    """Captions the text encoder will cut at model.max_caption_tokens — for the student, and for the
    reference-path teacher, which reads the caption plus its instruction in the same budget (a long caption cuts
    the instruction off). Counted with the folder's own tokenizer."""
    from transformers import AutoTokenizer

    folder = check_pipeline_folder(cfg.pretrained, "flux2")
    tokenizer = load_part(AutoTokenizer, folder, "tokenizer")
    limit = cfg.max_caption_tokens
    field = "model.max_caption_tokens"
    found = token_limit_problems(chat_token_counts(tokenizer, captions, thinking=False), limit, field)
    if cfg.teacher_context == "reference":
        joined = chat_token_counts(tokenizer, with_instruction(captions, teacher_instruction(cfg)), thinking=False)
        cut = {p.index for p in found}
        teacher = (
            "{n} tokens with the teacher's instruction appended; the text encoder reads the first {limit} "
            "({field}), so the teacher loses the end of the instruction"
        )
        found += [p for p in token_limit_problems(joined, limit, field, teacher) if p.index not in cut]
    hint = "shorten them or raise model.max_caption_tokens"
    return found + [CaptionProblem(None, hint, notice=True)] if found else []


def lora_layout() -> LoraLayout:
    return LORA_LAYOUT


def owns_network(network: nn.Module) -> bool:
    return any(type(m).__name__.startswith("Flux2Transformer") for m in network.modules())


def base_facts(network: nn.Module | None = None, lora: Mapping[str, Pair] | None = None) -> BaseFacts | None:
    """From the transformer's config (double blocks, single blocks, width), else from a LoRA's shapes."""
    size = transformer_size(network, lora)
    if size is None:
        return None
    known = VARIANTS.get(size)
    return BaseFacts(
        *(
            known
            or (
                f"FLUX.2 ({size[0]} double / {size[1]} single blocks, width {size[2]}; not a published size)",
                "Flux.2",
                "flux_2",
            )
        )
    )


def example_dataset(folder: Any) -> None:
    """No dataset ships with this family (the miniature's does)."""
    return None
