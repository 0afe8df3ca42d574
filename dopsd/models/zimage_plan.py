"""Z-Image-Turbo as `dopsd plan` sees it (dopsd.models.base.PlanSpec): its full-size networks and calls, built
from the bundled public configs unless model.pretrained is a local folder with its own; no weights."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from dopsd.core.schedules import shifted_schedule, training_schedule
from dopsd.models.base import PlanCall, PlanCheck, PlanSpec, PlanStage
from dopsd.models.local import check_size
from dopsd.models.plan_parts import qwen_text_plan_run, qwen_vl_plan, vae_plan_run
from dopsd.models.registry import pipeline_configs, torch_dtype
from dopsd.models.zimage import LORA_TARGETS, STEPS, ZImageAdapter, caption_limit


def plan_spec(cfg: Any, hint: str | None = None) -> PlanSpec:
    """The family hook (dopsd.models.base.FamilyModule.plan_spec); Z-Image has one variant, so `hint` is unused."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    conf, source = pipeline_configs(cfg.pretrained, ("transformer", "text_encoder", "vae"), "zimage-turbo")
    tc, te, vc = conf["transformer"], conf["text_encoder"], conf["vae"]
    dtype = torch_dtype(cfg.dtype)
    vlm_teacher = cfg.teacher_context == "vlm"
    axis0 = int(tc["axes_lens"][0])
    longest = caption_limit(tc["axes_lens"])  # as the adapter: the image's frame index sits after the caption
    s_tokens = min(cfg.max_caption_tokens, longest)
    t_tokens = min(cfg.teacher_max_tokens, longest) if vlm_teacher else s_tokens
    scale = 2 ** (len(vc["block_out_channels"]) - 1)
    channels, cap_dim = int(tc["in_channels"]), int(tc["cap_feat_dim"])
    pad32 = lambda n: n + (-n) % 32  # noqa: E731

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
            out.append(
                PlanCheck(
                    f"RoPE frame axis, {who}",
                    frame < axis0,
                    f"{n} tokens (padded {pad32(n)}) put the image at frame index {frame}; table "
                    f"axes_lens[0]={axis0} (longest caption {longest} tokens)",
                )
            )
        gh, gw = h // scale // 2, w // scale // 2
        lens = tc["axes_lens"]
        out.append(
            PlanCheck(
                "RoPE height/width axes",
                gh <= lens[1] and gw <= lens[2],
                f"{gh}x{gw} image tokens vs tables {lens[1]}x{lens[2]}",
            )
        )
        out.append(
            PlanCheck(
                "text encoder positions",
                s_tokens <= int(te.get("max_position_embeddings", 40960)),
                f"{s_tokens} tokens vs max_position_embeddings {te.get('max_position_embeddings')}",
            )
        )
        return out

    steps = cfg.inference_steps if cfg.inference_steps is not None else STEPS
    shift = cfg.shift if cfg.shift is not None else 3.0
    k = len(training_schedule(shifted_schedule(steps, shift), cfg.rollout_every)) - 1
    parts = {
        "transformer": lambda o: ZImageTransformer2DModel.from_config({**tc, **o}),
        "text_encoder": lambda o: Qwen3Model(Qwen3Config(**te)),
        "vae": lambda o: AutoencoderKL.from_config(vc),
    }
    # As the adapter runs caching: the VAE from the start, one large encoder on the device at a time (the VLM
    # takes over from the text encoder), the transformer only after all of them.
    stages = [
        PlanStage(
            "text features (Qwen3, 8 captions)",
            ("text_encoder",),
            ("text_encoder", "vae"),
            qwen_text_plan_run(s_tokens),
        )
    ]
    sources = {p: source for p in parts}
    notes = [f"student caption features: {s_tokens} tokens assumed (real captions are shorter; padding is removed)"]
    if vlm_teacher:
        build, run, vsource = qwen_vl_plan(cfg.teacher_encoder, dtype, t_tokens)
        parts["vlm"], sources["vlm"] = build, vsource
        stages.append(PlanStage("teacher features (Qwen3-VL, 1 image)", ("vlm",), ("vlm", "vae"), run, "teacher"))
        notes.append(
            f"teacher context: image + caption up to {t_tokens} tokens (model.teacher_max_tokens); "
            "the VLM's vision tower activations are not run (weights counted)"
        )
    last = "vlm" if vlm_teacher else "text_encoder"  # the encoder that ran last stays on the device meanwhile
    stages.append(
        PlanStage("SFT latents (VAE encode, 1 image)", ("vae",), (last, "vae"), vae_plan_run(dtype), "latents")
    )
    return PlanSpec(
        label="Z-Image-Turbo",
        dtype=dtype,
        parts=parts,
        depth={"n_layers": int(tc["n_layers"])},
        lora_targets=list(LORA_TARGETS),
        latent_shape=latent_shape,
        student=call(s_tokens),
        teacher=call(t_tokens),
        velocity=lambda net, x, s, c: ZImageAdapter.velocity(SimpleNamespace(dtype=dtype), net, x, s, c),
        decode=lambda parts, x: ZImageAdapter.decode(
            SimpleNamespace(vae=parts["vae"], device=x.device, vae_scale=scale), x
        ),
        rollout_steps=k,
        caching=stages,
        kept_while_training=("vae",),
        checks=checks,
        sources=sources,
        notes=notes,
    )
