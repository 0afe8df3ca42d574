"""The miniature as `dopsd plan` sees it (dopsd.models.base.PlanSpec): its networks and calls, no weights; its
config comes from the weights' manifest (the shipped turbo unless model.pretrained names other recipe weights)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from dopsd.core.schedules import shifted_schedule, training_schedule
from dopsd.mini.adapter import WEIGHTS_DIR, MiniAdapter, default_lora_targets, weights_file
from dopsd.mini.nets import MiniConfig, MiniDiT, MiniEncoder
from dopsd.models.base import PlanCall, PlanCheck, PlanSpec, PlanStage
from dopsd.models.registry import torch_dtype


def plan_spec(model_cfg: Any, hint: str | None = None) -> PlanSpec:
    """The family hook (dopsd.models.base.FamilyModule.plan_spec); the miniature has no variants to hint at."""
    pretrained = model_cfg.pretrained or "turbo"
    path = (
        WEIGHTS_DIR / f"{pretrained}.safetensors"
        if pretrained in ("turbo", "base")
        else Path(str(pretrained)).expanduser()
    )
    manifest = weights_file(path).parent / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no miniature manifest at {manifest}; point model.pretrained at recipe weights")
    cfg = MiniConfig.from_dict(json.loads(manifest.read_text())["config"])
    kind = "base" if weights_file(path).stem == "base" else "turbo"
    dtype = torch_dtype(model_cfg.dtype)
    res, t = cfg.res, cfg.max_tokens

    def latent_shape(h: int, w: int) -> tuple[int, ...]:
        if (h, w) != (res, res):
            raise ValueError(f"the miniature model renders {res}×{res} only; got {h}×{w}")
        return (3, res, res)

    def call(reference: bool):
        def make(h: int, w: int) -> PlanCall:
            def context(batch: int) -> dict[str, torch.Tensor]:
                ctx = {
                    "feats": torch.zeros(batch, t, cfg.enc_dim, dtype=dtype),
                    "feats_mask": torch.ones(batch, t, dtype=torch.bool),
                }
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

    steps = model_cfg.inference_steps or (cfg.base_steps if kind == "base" else cfg.turbo_steps)
    k = len(training_schedule(shifted_schedule(steps, cfg.shift), model_cfg.rollout_every)) - 1
    return PlanSpec(
        label=f"miniature ({pretrained})",
        dtype=dtype,
        parts={"transformer": lambda o: MiniDiT(dataclasses.replace(cfg, **o)), "encoder": lambda o: MiniEncoder(cfg)},
        depth={"layers": cfg.layers},
        lora_targets=default_lora_targets(),
        latent_shape=latent_shape,
        student=call(False),
        teacher=call(model_cfg.teacher_context == "reference"),
        velocity=lambda net, x, s, c: MiniAdapter.velocity(SimpleNamespace(cfg=cfg), net, x, s, c),
        rollout_steps=k,
        caching=[
            PlanStage("caption features (mini encoder, 8 captions)", ("encoder",), ("transformer", "encoder"), run)
        ],
        checks=lambda h, w: [PlanCheck("positions", True, f"learned positions for {cfg.num_patches} patches")],
        sources={"transformer": str(manifest), "encoder": str(manifest)},
        notes=["the miniature has no gradient checkpointing"],
    )
