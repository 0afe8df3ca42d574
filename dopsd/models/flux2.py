"""FLUX.2-klein (diffusers `Flux2KleinPipeline`) behind the `ModelAdapter` protocol.

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

from typing import Any

import torch
from PIL import Image
from torch import nn

from dopsd.config import ConfigError
from dopsd.models.base import CaptionProblem, Context
from dopsd.models.local import ModelFolderError, cfg_get, chat_token_counts, chat_tokens, check_pipeline_folder, check_size, folder_fingerprint, free_memory, load_part, resolve_dtype, stack_or_list, still_loaded, to_pixels, token_limit_problems
from dopsd.schedules import flux2_schedule

# `attn.to_out` is a ModuleList in double blocks (peft rejects it), a Linear in single blocks: hence a regex.
LORA_TARGETS = (
    r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|.*single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
)
REFERENCE_INSTRUCTION = "Make the main subject, background and overall composition consistent with the reference image."
EDIT_INSTRUCTION = "The last reference image is the expected output of this edit."


def _ids(t: int, h: int, w: int) -> torch.Tensor:
    """(h·w, 4) position ids (T, H, W, L) of one packed image, row-major like the pipeline's."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))


class Flux2Adapter:
    name = "flux2"

    def __init__(self, cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None):
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.folder = check_pipeline_folder(cfg_get(cfg, "pretrained", None), "flux2")
        self.teacher_mode = cfg_get(cfg, "teacher_context", "reference")
        if self.teacher_mode not in ("reference", "vlm", "text"):
            raise ConfigError(f"model.teacher_context must be 'reference', 'vlm' or 'text' for FLUX.2, got {self.teacher_mode!r}")
        self.editing = bool(cfg_get(cfg, "editing", False))
        if self.editing and self.teacher_mode != "reference":
            raise ConfigError("model.editing trains through the reference path: set model.teacher_context: reference")
        self.instruction = teacher_instruction(cfg)
        self.network: nn.Module = load_part(Flux2Transformer2DModel, self.folder, "transformer", self.dtype).to(self.device)
        self.vae = load_part(AutoencoderKLFlux2, self.folder, "vae", self.dtype).to(self.device).eval().requires_grad_(False)
        self.text_encoder = load_part(Qwen3ForCausalLM, self.folder, "text_encoder", self.dtype).to(self.device).eval()
        self.text_encoder.requires_grad_(False)
        self.tokenizer = load_part(AutoTokenizer, self.folder, "tokenizer")
        self.layers = tuple(int(k) for k in cfg_get(cfg, "text_encoder_out_layers", (9, 18, 27)))
        depth = self.text_encoder.config.num_hidden_layers
        if max(self.layers) > depth:
            raise ModelFolderError(f"model.pretrained: text_encoder_out_layers {self.layers} exceed the {depth} layers of "
                                   f"{self.folder}/text_encoder; is this the FLUX.2-klein text encoder?")
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.steps = int(cfg_get(cfg, "inference_steps", 4))
        self.max_tokens = int(cfg_get(cfg, "max_caption_tokens", 512))
        self.teacher_max_tokens = int(cfg_get(cfg, "teacher_max_tokens", 1024))
        bn = self.vae.bn
        self.bn_mean = bn.running_mean.detach().float().view(1, -1, 1, 1).to(self.device)
        self.bn_std = torch.sqrt(bn.running_var.detach().float() + self.vae.config.batch_norm_eps).view(1, -1, 1, 1).to(self.device)
        self._vlm = None

    # --- the denoiser -----------------------------------------------------------------------------

    def velocity(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: Any) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1)
        img_ids = _ids(0, h, w).to(x.device)
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
        encoder = still_loaded(self.text_encoder, "text encoder")
        ids, mask = chat_tokens(tokenizer, captions, self.max_tokens, thinking=False, device=self.device)
        out = encoder(input_ids=ids, attention_mask=mask,
                      output_hidden_states=True, use_cache=False)
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
            ids.append(_ids(10 * (i + 1), h, w))
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
        if self.teacher_mode == "text":
            return self.student_contexts(captions, sources)
        if self.teacher_mode == "vlm":
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
            from dopsd.models.qwen_vl import QwenVLEncoder

            self._vlm = QwenVLEncoder(
                cfg_get(self.cfg, "teacher_encoder", None), still_loaded(self.text_encoder, "text encoder"),
                self.device, self.dtype, image_tokens=int(cfg_get(self.cfg, "teacher_image_tokens", 256)),
            )
            print(f"[dopsd] VLM teacher: {self._vlm.report}")
        return [{"prompt_embeds": self._vlm.encode(im, c, self.layers, pad_to=self.teacher_max_tokens).cpu()}
                for c, im in zip(captions, images)]

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
        lat = self.to_vae_latents(latents)
        return self.vae.decode(lat.to(self.vae.dtype), return_dict=False)[0].float().clamp(-1, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        multiple = self.vae_scale * 2
        check_size(height, width, multiple, "FLUX.2")
        return (self.network.config.in_channels, height // multiple, width // multiple)

    def inference_schedule(self, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        _, h, w = self.latent_shape(height, width)
        return flux2_schedule(steps or self.steps, h * w)

    def cache_fingerprint(self) -> dict[str, Any]:
        """Settings that change cached contexts but are not in the config's model section."""
        return {"adapter_version": 1, "teacher_max_tokens": self.teacher_max_tokens,
                "teacher_image_tokens": int(cfg_get(self.cfg, "teacher_image_tokens", 256)),
                "layers": list(getattr(self, "layers", (-2,))), "weights": folder_fingerprint(self.folder),
                "teacher_weights": folder_fingerprint(cfg_get(self.cfg, "teacher_encoder", None))}

    def default_lora_targets(self) -> str:
        return LORA_TARGETS

    def release_encoders(self) -> None:
        self.text_encoder = None
        if self._vlm is not None:
            self._vlm.release()
        self._vlm = None
        free_memory()

    # --- helpers for export / eval ----------------------------------------------------------------

    def pipeline(self, transformer: nn.Module | None = None):
        """A `Flux2KleinPipeline` around this adapter's parts (text encoder must still be loaded)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

        scheduler = load_part(FlowMatchEulerDiscreteScheduler, self.folder, "scheduler")
        return Flux2KleinPipeline(scheduler=scheduler, vae=self.vae, text_encoder=still_loaded(self.text_encoder, "text encoder"),
                                  tokenizer=self.tokenizer, transformer=transformer or self.network, is_distilled=True)

    @property
    def pipeline_class(self):
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline


def teacher_instruction(cfg: Any) -> str:
    """What the reference-path teacher reads after the caption."""
    default = EDIT_INSTRUCTION if cfg_get(cfg, "editing", False) else REFERENCE_INSTRUCTION
    return str(cfg_get(cfg, "teacher_instruction", default))


def with_instruction(captions: list[str], instruction: str) -> list[str]:
    return [f"{c.rstrip()} {instruction}".strip() for c in captions]


def caption_problems(cfg: Any, captions: list[str]) -> list[CaptionProblem]:
    """The family hook (dopsd.models.base): captions the text encoder will cut at model.max_caption_tokens —
    for the student, and for the reference-path teacher, which reads the caption plus its instruction in the
    same budget (a long caption cuts the instruction off). Counted with the folder's own tokenizer."""
    from transformers import AutoTokenizer

    folder = check_pipeline_folder(cfg_get(cfg, "pretrained", None), "flux2")
    tokenizer = load_part(AutoTokenizer, folder, "tokenizer")
    limit = int(cfg_get(cfg, "max_caption_tokens", 512))
    field = "model.max_caption_tokens"
    found = token_limit_problems(chat_token_counts(tokenizer, captions, thinking=False), limit, field)
    if cfg_get(cfg, "teacher_context", "reference") == "reference":
        joined = chat_token_counts(tokenizer, with_instruction(captions, teacher_instruction(cfg)), thinking=False)
        cut = {p.index for p in found}
        teacher = ("{n} tokens with the teacher's instruction appended; the text encoder reads the first {limit} "
                   "({field}), so the teacher loses the end of the instruction")
        found += [p for p in token_limit_problems(joined, limit, field, teacher) if p.index not in cut]
    hint = "shorten them or raise model.max_caption_tokens"
    return found + [CaptionProblem(None, hint, notice=True)] if found else []


def load(cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> Flux2Adapter:
    return Flux2Adapter(cfg, device, dtype)


# --- planning (`dopsd plan`): the full-size networks and calls of this family, no weights --------------------

def plan_variant(cfg: Any, hint: str | None) -> str:
    """Bundled config to plan when model.pretrained is not a local folder: klein 9B if the hint or the folder
    name says 9B, else klein 4B."""
    text = f"{hint or ''} {cfg_get(cfg, 'pretrained', '') or ''}".lower()
    return "flux2-klein-9b" if "9b" in text else "flux2-klein-4b"


def plan_spec(cfg: Any, hint: str | None = None):
    """FLUX.2-klein as `dopsd plan` sees it (dopsd.models.base.PlanSpec)."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dopsd.models.base import PlanCall, PlanCheck, PlanSpec, PlanStage
    from dopsd.models.registry import fullsize_config, pipeline_configs, torch_dtype
    from dopsd.models.zimage import qwen_text_plan_run, qwen_vl_plan, vae_plan_run
    from dopsd.schedules import flux2_schedule, training_schedule

    variant = plan_variant(cfg, hint)
    conf, source = pipeline_configs(cfg_get(cfg, "pretrained", None), ("transformer", "text_encoder", "vae"), variant)
    tc, te, vc = conf["transformer"], conf["text_encoder"], conf["vae"]
    label = fullsize_config(variant)["label"] if source.startswith("bundled") else f"FLUX.2 ({source})"
    dtype = torch_dtype(cfg_get(cfg, "dtype", "bfloat16"))
    height, width = int(cfg_get(cfg, "height", 1024)), int(cfg_get(cfg, "width", 1024))
    teacher_mode = cfg_get(cfg, "teacher_context", "reference")
    editing = bool(cfg_get(cfg, "editing", False))
    s_tokens = int(cfg_get(cfg, "max_caption_tokens", 512))
    t_text = int(cfg_get(cfg, "teacher_max_tokens", 1024)) if teacher_mode == "vlm" else s_tokens
    scale = 2 ** (len(vc["block_out_channels"]) - 1)
    channels, joint = int(tc["in_channels"]), int(tc["joint_attention_dim"])

    def latent_shape(h: int, w: int) -> tuple[int, ...]:
        check_size(h, w, scale * 2, "FLUX.2")
        return (channels, h // scale // 2, w // scale // 2)

    def call(text: int, refs: int):
        def make(h: int, w: int) -> PlanCall:
            n = (h // scale // 2) * (w // scale // 2)  # references at the training size, like the target

            def context(batch: int) -> dict[str, torch.Tensor]:
                zero = torch.zeros(1, dtype=torch.long)
                ctx = {"prompt_embeds": torch.zeros(batch, text, joint, dtype=dtype),
                       "txt_ids": torch.cartesian_prod(zero, zero, zero, torch.arange(text))}
                if refs:
                    ctx["ref_tokens"] = torch.zeros(batch, refs * n, channels, dtype=dtype)
                    ctx["ref_ids"] = torch.cat([_ids(10 * (i + 1), h // scale // 2, w // scale // 2) for i in range(refs)])
                return ctx

            tokens = {"image": n, "text": text}
            if refs:
                tokens["reference"] = refs * n
            return PlanCall(context, tokens)

        return make

    s_refs = 1 if editing else 0  # editing: one source image of the training size assumed
    t_refs = s_refs + (1 if teacher_mode == "reference" else 0)

    def checks(h: int, w: int) -> list[PlanCheck]:
        n = (h // scale // 2) * (w // scale // 2)
        return [
            PlanCheck("RoPE", True, f"computed from position ids on every call (no table): teacher sequence "
                      f"{n} noisy + {t_refs * n} reference + {t_text} text tokens"),
            PlanCheck("text encoder positions", s_tokens <= int(te.get("max_position_embeddings", 40960)),
                      f"{s_tokens} tokens vs max_position_embeddings {te.get('max_position_embeddings')}"),
        ]

    steps = int(cfg_get(cfg, "inference_steps", 4))
    n1024 = (height // scale // 2) * (width // scale // 2)
    k = len(training_schedule(flux2_schedule(steps, n1024), int(cfg_get(cfg, "rollout_every", 1)))) - 1
    parts = {
        "transformer": lambda o: Flux2Transformer2DModel.from_config({**tc, **o}),
        "text_encoder": lambda o: Qwen3ForCausalLM(Qwen3Config(**te)),
        "vae": lambda o: AutoencoderKLFlux2.from_config(vc),
    }
    loaded = ("transformer", "vae", "text_encoder")  # the adapter loads all three at once
    text_run = qwen_text_plan_run(s_tokens, use_cache=False)
    stages = [PlanStage("text features (Qwen3, 8 captions)", ("text_encoder",), loaded, text_run)]
    sources = {p: source for p in parts}
    notes = [f"text padded to {s_tokens} tokens and attended in full (as the pipeline)"]
    if editing:
        notes.append("editing: one source image of the training size per sample assumed")
    if teacher_mode == "reference":
        stages.append(PlanStage("teacher reference latents (VAE encode, 1 image)", ("vae",), loaded,
                                vae_plan_run(dtype), "teacher"))
    elif teacher_mode == "vlm":
        build, run, vsource, _ = qwen_vl_plan(cfg_get(cfg, "teacher_encoder", None), dtype, t_text)
        parts["vlm"], sources["vlm"] = build, vsource
        stages.append(PlanStage("teacher features (Qwen3-VL, 1 image)", ("vlm",), loaded + ("vlm",), run, "teacher"))
    stages.append(PlanStage("SFT latents (VAE encode, 1 image)", ("vae",), loaded, vae_plan_run(dtype), "latents"))
    return PlanSpec(
        label=label, dtype=dtype, parts=parts,
        depth={"num_layers": int(tc["num_layers"]), "num_single_layers": int(tc["num_single_layers"])},
        lora_targets=LORA_TARGETS, latent_shape=latent_shape, student=call(s_tokens, s_refs),
        teacher=call(t_text, t_refs),
        velocity=lambda net, x, s, c: Flux2Adapter.velocity(SimpleNamespace(dtype=dtype), net, x, s, c),
        rollout_steps=k, caching=stages, kept_while_training=("vae",), checks=checks, sources=sources, notes=notes,
    )
