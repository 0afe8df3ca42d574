"""FLUX.2-klein as `dopsd plan` sees it (dopsd.models.base.PlanSpec): its full-size networks and calls, built from
the bundled public configs (klein 4B or 9B) unless model.pretrained is a local folder with its own; no weights."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from dopsd.core.schedules import training_schedule
from dopsd.models.base import PlanCall, PlanCheck, PlanSpec, PlanStage
from dopsd.models.flux2 import Flux2Adapter
from dopsd.models.flux2_facts import LORA_TARGETS, STEPS, flux2_schedule, position_ids
from dopsd.models.local import check_size
from dopsd.models.plan_parts import qwen_text_plan_run, qwen_vl_plan, vae_plan_run
from dopsd.models.registry import fullsize_config, pipeline_configs, torch_dtype


def plan_variant(cfg: Any, hint: str | None) -> str:
    """Bundled config to plan when model.pretrained is not a local folder: klein 9B if the hint or the folder
    name says 9B, else klein 4B."""
    text = f"{hint or ''} {cfg.pretrained or ''}".lower()
    return "flux2-klein-9b" if "9b" in text else "flux2-klein-4b"


def plan_spec(cfg: Any, hint: str | None = None) -> PlanSpec:
    """The family hook (dopsd.models.base.FamilyModule.plan_spec)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    variant = plan_variant(cfg, hint)
    conf, source = pipeline_configs(cfg.pretrained, ("transformer", "text_encoder", "vae"), variant)
    tc, te, vc = conf["transformer"], conf["text_encoder"], conf["vae"]
    label = fullsize_config(variant)["label"] if source.startswith("bundled") else f"FLUX.2 ({source})"
    dtype = torch_dtype(cfg.dtype)
    height, width = cfg.height, cfg.width
    s_tokens = cfg.max_caption_tokens
    t_text = cfg.teacher_max_tokens if cfg.teacher_context == "vlm" else s_tokens
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
                ctx = {
                    "prompt_embeds": torch.zeros(batch, text, joint, dtype=dtype),
                    "txt_ids": torch.cartesian_prod(zero, zero, zero, torch.arange(text)),
                }
                if refs:
                    ctx["ref_tokens"] = torch.zeros(batch, refs * n, channels, dtype=dtype)
                    ctx["ref_ids"] = torch.cat(
                        [position_ids(10 * (i + 1), h // scale // 2, w // scale // 2) for i in range(refs)]
                    )
                return ctx

            tokens = {"image": n, "text": text}
            if refs:
                tokens["reference"] = refs * n
            return PlanCall(context, tokens)

        return make

    s_refs = 1 if cfg.editing else 0  # editing: one source image of the training size assumed
    t_refs = s_refs + (1 if cfg.teacher_context == "reference" else 0)

    def checks(h: int, w: int) -> list[PlanCheck]:
        n = (h // scale // 2) * (w // scale // 2)
        return [
            PlanCheck(
                "RoPE",
                True,
                f"computed from position ids on every call (no table): teacher sequence "
                f"{n} noisy + {t_refs * n} reference + {t_text} text tokens",
            ),
            PlanCheck(
                "text encoder positions",
                s_tokens <= int(te.get("max_position_embeddings", 40960)),
                f"{s_tokens} tokens vs max_position_embeddings {te.get('max_position_embeddings')}",
            ),
        ]

    steps = cfg.inference_steps if cfg.inference_steps is not None else STEPS
    n1024 = (height // scale // 2) * (width // scale // 2)
    k = len(training_schedule(flux2_schedule(steps, n1024), cfg.rollout_every)) - 1
    parts = {
        "transformer": lambda o: Flux2Transformer2DModel.from_config({**tc, **o}),
        "text_encoder": lambda o: Qwen3Model(Qwen3Config(**te)),  # as the adapter loads it: no lm_head
        "vae": lambda o: AutoencoderKLFlux2.from_config(vc),
    }
    # As the adapter runs caching: the VAE from the start, one large encoder on the device at a time (the VLM
    # takes over from the text encoder), the transformer only after all of them.
    loaded = ("text_encoder", "vae")
    text_run = qwen_text_plan_run(s_tokens, use_cache=False)
    stages = [PlanStage("text features (Qwen3, 8 captions)", ("text_encoder",), loaded, text_run)]
    sources = {p: source for p in parts}
    notes = [f"text padded to {s_tokens} tokens and attended in full (as the pipeline)"]
    if cfg.editing:
        notes.append("editing: one source image of the training size per sample assumed")
    if cfg.teacher_context == "reference":
        stages.append(
            PlanStage(
                "teacher reference latents (VAE encode, 1 image)", ("vae",), loaded, vae_plan_run(dtype), "teacher"
            )
        )
    elif cfg.teacher_context == "vlm":
        build, run, vsource = qwen_vl_plan(cfg.teacher_encoder, dtype, t_text)
        parts["vlm"], sources["vlm"] = build, vsource
        loaded = ("vlm", "vae")
        stages.append(PlanStage("teacher features (Qwen3-VL, 1 image)", ("vlm",), loaded, run, "teacher"))
    stages.append(PlanStage("SFT latents (VAE encode, 1 image)", ("vae",), loaded, vae_plan_run(dtype), "latents"))
    return PlanSpec(
        label=label,
        dtype=dtype,
        parts=parts,
        depth={"num_layers": int(tc["num_layers"]), "num_single_layers": int(tc["num_single_layers"])},
        lora_targets=LORA_TARGETS,
        latent_shape=latent_shape,
        student=call(s_tokens, s_refs),
        teacher=call(t_text, t_refs),
        velocity=lambda net, x, s, c: Flux2Adapter.velocity(SimpleNamespace(dtype=dtype), net, x, s, c),
        decode=lambda parts, x: Flux2Adapter.decode(_decoding(parts["vae"], scale, x.device), x),
        rollout_steps=k,
        caching=stages,
        kept_while_training=("vae",),
        checks=checks,
        sources=sources,
        notes=notes,
    )


def _decoding(vae: Any, scale: int, device: torch.device) -> SimpleNamespace:
    """What `Flux2Adapter.decode` reads of its adapter, for a VAE built by the planner."""
    bn = vae.bn
    ns = SimpleNamespace(vae=vae, vae_scale=scale, device=device)
    ns.bn_mean = bn.running_mean.detach().float().view(1, -1, 1, 1)
    ns.bn_std = torch.sqrt(bn.running_var.detach().float() + vae.config.batch_norm_eps).view(1, -1, 1, 1)
    ns.to_vae_latents = lambda latents: Flux2Adapter.to_vae_latents(ns, latents)
    return ns
