"""Z-Image-Turbo (diffusers `ZImagePipeline`) behind the `ModelAdapter` protocol.

Conventions translated here (pinned by tests against the pipeline itself):
  * the transformer takes *lists*: latents (C, 1, H, W) per sample and caption features (L_i, D) with
    padding removed;
  * its timestep is 1 − σ (0 = pure noise), and it predicts x0 − ε: the velocity is the *negated* output;
  * student text features: Qwen3 chat template (thinking enabled), hidden_states[-2], padding removed;
  * teacher ("vlm"): the same layer of a Qwen3-VL carrying the text encoder's weights, over
    image tokens then the caption (see `dopsd.models.qwen_vl`).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn

from dopsd.config import ConfigError
from dopsd.models.base import CaptionProblem, Context
from dopsd.models.local import ModelFolderError, cfg_get, chat_token_counts, chat_tokens, check_pipeline_folder, check_size, folder_fingerprint, free_memory, load_part, read_json, resolve_dtype, stack_or_list, still_loaded, to_pixels, token_limit_problems
from dopsd.schedules import exponential_shift, shifted_schedule

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]


class ZImageAdapter:
    name = "zimage"

    def __init__(self, cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None):
        from diffusers import AutoencoderKL, ZImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen3Model

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.folder = check_pipeline_folder(cfg_get(cfg, "pretrained", None), "zimage")
        self.teacher_mode = cfg_get(cfg, "teacher_context", "vlm")
        if self.teacher_mode not in ("vlm", "text"):
            raise ConfigError(
                f"model.teacher_context={self.teacher_mode!r} is not available for Z-Image-Turbo: it has no "
                "reference-image input; use 'vlm' (or 'text' for a caption-only teacher)"
            )
        if cfg_get(cfg, "editing", False):
            raise ConfigError("model.editing is a FLUX.2-klein mode; Z-Image-Turbo has no editing path: set it to false")
        self.network: nn.Module = load_part(ZImageTransformer2DModel, self.folder, "transformer", self.dtype).to(self.device)
        for name in ("x_pad_token", "cap_pad_token"):
            token = getattr(self.network, name, None)
            if token is not None and not torch.isfinite(token).all():
                raise ModelFolderError(f"model.pretrained: {self.folder}/transformer: {name} is not finite; the "
                                       "checkpoint is incomplete: download it again")
        self.vae = load_part(AutoencoderKL, self.folder, "vae", self.dtype).to(self.device).eval().requires_grad_(False)
        self.text_encoder = load_part(Qwen3Model, self.folder, "text_encoder", self.dtype).to(self.device).eval()
        self.text_encoder.requires_grad_(False)
        self.tokenizer = load_part(AutoTokenizer, self.folder, "tokenizer")
        self.scheduler_config = read_json(self.folder / "scheduler" / "scheduler_config.json")
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.steps = int(cfg_get(cfg, "inference_steps", 8))
        self.caption_limit = caption_limit(self.network.config.axes_lens)
        self.max_tokens = min(int(cfg_get(cfg, "max_caption_tokens", 512)), self.caption_limit)
        self.teacher_max_tokens = min(int(cfg_get(cfg, "teacher_max_tokens", 1024)), self.caption_limit)
        self._vlm = None

    # --- the denoiser -----------------------------------------------------------------------------

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
        encoder = still_loaded(self.text_encoder, "text encoder")
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
            from dopsd.models.qwen_vl import QwenVLEncoder

            self._vlm = QwenVLEncoder(
                cfg_get(self.cfg, "teacher_encoder", None), still_loaded(self.text_encoder, "text encoder"),
                self.device, self.dtype, image_tokens=int(cfg_get(self.cfg, "teacher_image_tokens", 256)),
            )
            print(f"[dopsd] VLM teacher: {self._vlm.report}")
        return self._vlm

    @torch.no_grad()
    def teacher_contexts(
        self, captions: list[str], images: list[Image.Image], sources: list[list[Image.Image]] | None = None
    ) -> list[Context]:
        if sources is not None and any(sources):
            raise ValueError("Z-Image-Turbo has no source-image input (editing is FLUX.2-klein only)")
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images")
        if self.teacher_mode == "text":
            return self.student_contexts(captions)
        vlm = self.vlm()
        return [{"cap_feats": vlm.encode(im, c, layers=(-2,), max_tokens=self.teacher_max_tokens).cpu()}
                for c, im in zip(captions, images)]

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
        z = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        multiple = self.vae_scale * 2
        check_size(height, width, multiple, "Z-Image")
        return (self.network.config.in_channels, height // self.vae_scale, width // self.vae_scale)

    def inference_schedule(self, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        steps = steps or self.steps
        sc = self.scheduler_config
        shift = cfg_get(self.cfg, "shift", None)
        if shift is not None or not sc.get("use_dynamic_shifting", False):
            return shifted_schedule(steps, float(shift if shift is not None else sc.get("shift", 3.0)))
        # Dynamic shifting (not Turbo's setting): the pipeline's linear μ in the image token count.
        seq = (height // self.vae_scale // 2) * (width // self.vae_scale // 2)
        base, top = sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096)
        lo, hi = sc.get("base_shift", 0.5), sc.get("max_shift", 1.15)
        mu = lo + (hi - lo) * (seq - base) / (top - base)
        grid = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        return torch.cat([exponential_shift(grid, mu), grid.new_zeros(1)]).float()

    def cache_fingerprint(self) -> dict[str, Any]:
        """Settings that change cached contexts but are not in the config's model section."""
        return {"adapter_version": 1, "teacher_max_tokens": self.teacher_max_tokens,
                "teacher_image_tokens": int(cfg_get(self.cfg, "teacher_image_tokens", 256)),
                "layers": list(getattr(self, "layers", (-2,))), "weights": folder_fingerprint(self.folder),
                "teacher_weights": folder_fingerprint(cfg_get(self.cfg, "teacher_encoder", None))}

    def default_lora_targets(self) -> list[str]:
        return list(LORA_TARGETS)

    def release_encoders(self) -> None:
        self.text_encoder = None
        if self._vlm is not None:
            self._vlm.release()
        self._vlm = None
        free_memory()

    # --- helpers for export / eval ----------------------------------------------------------------

    def pipeline(self, transformer: nn.Module | None = None):
        """A `ZImagePipeline` around this adapter's parts (text encoder must still be loaded)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        scheduler = load_part(FlowMatchEulerDiscreteScheduler, self.folder, "scheduler")
        return ZImagePipeline(scheduler=scheduler, vae=self.vae, text_encoder=still_loaded(self.text_encoder, "text encoder"),
                              tokenizer=self.tokenizer, transformer=transformer or self.network)

    @property
    def pipeline_class(self):
        from diffusers import ZImagePipeline

        return ZImagePipeline


def caption_limit(axes_lens: list[int]) -> int:
    """Captions are padded to a multiple of 32 and the image's first RoPE index sits right after them, so a
    caption may not exceed axes_lens[0] − 32 tokens (992 for an axis of 1024): longer ones index past RoPE."""
    return (int(axes_lens[0]) - 2) // 32 * 32


def caption_problems(cfg: Any, captions: list[str]) -> list[CaptionProblem]:
    """The family hook (dopsd.models.base): captions the text encoder will cut, counted with the folder's own
    tokenizer and chat template (only the tokenizer and the transformer's config are read)."""
    from transformers import AutoTokenizer

    folder = check_pipeline_folder(cfg_get(cfg, "pretrained", None), "zimage")
    most = caption_limit(read_json(folder / "transformer" / "config.json").get("axes_lens", [1024]))
    limit = min(int(cfg_get(cfg, "max_caption_tokens", 512)), most)
    counts = chat_token_counts(load_part(AutoTokenizer, folder, "tokenizer"), captions, thinking=True)
    found = token_limit_problems(counts, limit, "model.max_caption_tokens")
    hint = f"shorten them, or raise model.max_caption_tokens (this Z-Image reads at most {most} caption tokens)"
    return found + [CaptionProblem(None, hint, notice=True)] if found else []


def load(cfg: Any, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> ZImageAdapter:
    return ZImageAdapter(cfg, device, dtype)


# --- planning (`dopsd plan`): the full-size networks and calls of this family, no weights --------------------

def qwen_text_plan_run(max_tokens: int, batch: int = 8, **kwargs: Any):
    """The feature cache's text-encoder call: a batch of captions padded to max_tokens, every hidden state kept."""

    def run(parts: dict[str, nn.Module], height: int, width: int) -> Any:
        ids = torch.zeros(batch, max_tokens, dtype=torch.long)
        mask = torch.ones(batch, max_tokens, dtype=torch.bool)
        return parts["text_encoder"](input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)

    return run


def qwen_vl_plan(teacher_folder: Any, dtype: torch.dtype, tokens: int):
    """(builder, stage run, source) of the Qwen3-VL teacher encoder for planning.

    The run covers its language model over `tokens` positions (image + caption) with every hidden state kept;
    the vision tower's own activations (one image, no grad) are not run: its index bookkeeping needs real
    values, which fake tensors do not have. Its weights are counted."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from dopsd.models.registry import model_config

    conf, source = model_config(teacher_folder, "qwen3-vl-4b-instruct")

    def build(_: dict[str, int]) -> nn.Module:
        return Qwen3VLModel(Qwen3VLConfig(**conf))

    hidden = int(conf["text_config"]["hidden_size"])

    def run(parts: dict[str, nn.Module], height: int, width: int) -> Any:
        emb = torch.zeros(1, tokens, hidden, dtype=dtype)
        pos = torch.zeros(3, 1, tokens, dtype=torch.long)  # M-RoPE ids (their values do not change memory)
        return parts["vlm"].language_model(inputs_embeds=emb, position_ids=pos, output_hidden_states=True)

    return build, run, source, conf


def vae_plan_run(dtype: torch.dtype):
    """The feature cache's VAE call: one image at the training size (encode_images runs them one by one)."""

    def run(parts: dict[str, nn.Module], height: int, width: int) -> Any:
        return parts["vae"].encode(torch.zeros(1, 3, height, width, dtype=dtype)).latent_dist.mode()

    return run


def plan_spec(cfg: Any, hint: str | None = None):
    """Z-Image-Turbo as `dopsd plan` sees it (dopsd.models.base.PlanSpec): bundled public configs unless
    model.pretrained is a local folder with its own."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from dopsd.models.base import PlanCall, PlanCheck, PlanSpec, PlanStage
    from dopsd.models.registry import pipeline_configs, torch_dtype
    from dopsd.schedules import shifted_schedule, training_schedule

    conf, source = pipeline_configs(cfg_get(cfg, "pretrained", None), ("transformer", "text_encoder", "vae"),
                                    "zimage-turbo")
    tc, te, vc = conf["transformer"], conf["text_encoder"], conf["vae"]
    dtype = torch_dtype(cfg_get(cfg, "dtype", "bfloat16"))
    teacher_mode = cfg_get(cfg, "teacher_context", "vlm")
    axis0 = int(tc["axes_lens"][0])
    caption_limit = (axis0 - 2) // 32 * 32  # as the adapter: the image's frame index sits after the caption
    s_tokens = min(int(cfg_get(cfg, "max_caption_tokens", 512)), caption_limit)
    t_tokens = min(int(cfg_get(cfg, "teacher_max_tokens", 1024)), caption_limit) if teacher_mode == "vlm" else s_tokens
    scale = 2 ** (len(vc["block_out_channels"]) - 1)
    channels, cap_dim = int(tc["in_channels"]), int(tc["cap_feat_dim"])
    pad32 = lambda n: n + (-n) % 32

    def latent_shape(h: int, w: int) -> tuple[int, ...]:
        check_size(h, w, scale * 2, "Z-Image")
        return (channels, h // scale, w // scale)

    def call(length: int):
        def make(h: int, w: int) -> PlanCall:
            def context(batch: int) -> dict[str, list[torch.Tensor]]:
                return {"cap_feats": [torch.zeros(length, cap_dim, dtype=dtype) for _ in range(batch)]}

            return PlanCall(context, {"image": (h // scale // 2) * (w // scale // 2), "caption": pad32(length)})

        return make

    def checks(h: int, w: int) -> list[PlanCheck]:
        out = []
        for who, n in (("student caption", s_tokens), ("teacher context", t_tokens)):
            frame = pad32(n) + 1
            out.append(PlanCheck(f"RoPE frame axis, {who}", frame < axis0,
                                 f"{n} tokens (padded {pad32(n)}) put the image at frame index {frame}; table "
                                 f"axes_lens[0]={axis0} (longest caption {caption_limit} tokens)"))
        gh, gw = h // scale // 2, w // scale // 2
        lens = tc["axes_lens"]
        out.append(PlanCheck("RoPE height/width axes", gh <= lens[1] and gw <= lens[2],
                             f"{gh}x{gw} image tokens vs tables {lens[1]}x{lens[2]}"))
        out.append(PlanCheck("text encoder positions", s_tokens <= int(te.get("max_position_embeddings", 40960)),
                             f"{s_tokens} tokens vs max_position_embeddings {te.get('max_position_embeddings')}"))
        return out

    steps = int(cfg_get(cfg, "inference_steps", 8))
    shift = float(cfg_get(cfg, "shift", 3.0))
    k = len(training_schedule(shifted_schedule(steps, shift), int(cfg_get(cfg, "rollout_every", 1)))) - 1
    parts = {
        "transformer": lambda o: ZImageTransformer2DModel.from_config({**tc, **o}),
        "text_encoder": lambda o: Qwen3Model(Qwen3Config(**te)),
        "vae": lambda o: AutoencoderKL.from_config(vc),
    }
    loaded = ("transformer", "vae", "text_encoder")  # the adapter loads all three at once
    stages = [PlanStage("text features (Qwen3, 8 captions)", ("text_encoder",), loaded, qwen_text_plan_run(s_tokens))]
    sources = {p: source for p in parts}
    notes = [f"student caption features: {s_tokens} tokens assumed (real captions are shorter; padding is removed)"]
    if teacher_mode == "vlm":
        build, run, vsource, _ = qwen_vl_plan(cfg_get(cfg, "teacher_encoder", None), dtype, t_tokens)
        parts["vlm"], sources["vlm"] = build, vsource
        stages.append(PlanStage("teacher features (Qwen3-VL, 1 image)", ("vlm",), loaded + ("vlm",), run, "teacher"))
        notes.append(f"teacher context: image + caption up to {t_tokens} tokens (model.teacher_max_tokens); "
                     "the VLM's vision tower activations are not run (weights counted)")
    stages.append(PlanStage("SFT latents (VAE encode, 1 image)", ("vae",), loaded, vae_plan_run(dtype), "latents"))
    return PlanSpec(
        label="Z-Image-Turbo", dtype=dtype, parts=parts, depth={"n_layers": int(tc["n_layers"])},
        lora_targets=list(LORA_TARGETS), latent_shape=latent_shape, student=call(s_tokens), teacher=call(t_tokens),
        velocity=lambda net, x, s, c: ZImageAdapter.velocity(SimpleNamespace(dtype=dtype), net, x, s, c),
        rollout_steps=k, caching=stages, kept_while_training=("vae",), checks=checks, sources=sources, notes=notes,
    )
