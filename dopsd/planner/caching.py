"""The feature-caching phase before training: each encoder call with what is loaded on the device meanwhile.

Each stage (declared by the family: dopsd.models.base.PlanStage) runs its encoder call once, no grad, on
fake/meta tensors at full size; its peak is the weights of every part loaded at that time plus the call's
live-bytes peak. The adapters load the denoiser only after caching and keep one large encoder on the device at
a time (plus the small VAE), so a stage's `loaded` parts are that encoder and the VAE; `sequential` is the stage
with only the parts its own call uses.
"""

from __future__ import annotations

from typing import Any

import torch

from dopsd.planner.fake import LiveBytes, build_meta, fused_attention, new_mode, to_fake
from dopsd.planner.resident import GiB, module_bytes


def caching_peaks(spec: Any, choice: Any, target: str = "gpu") -> dict[str, Any]:
    weights: dict[str, int] = {}

    def part_bytes(name: str) -> int:
        if name not in weights:
            module = build_meta(lambda: spec.parts[name]({}), spec.dtype)
            weights[name] = module_bytes(module, choice.quantize if name == spec.denoiser else "none")
        return weights[name]

    stages = []
    for stage in spec.caching:
        parts = {
            n: build_meta(lambda n=n: spec.parts[n]({}), spec.dtype).eval().requires_grad_(False) for n in stage.uses
        }
        mode = new_mode()  # fake CPU tensors: transformers' mask helpers read values that meta tensors lack
        for m in parts.values():
            to_fake(m, mode)
        with mode, fused_attention(target == "gpu"), torch.no_grad():
            tr = LiveBytes([t for m in parts.values() for t in list(m.parameters()) + list(m.buffers())])
            with tr:
                stage.run(parts, choice.height, choice.width)
        loaded = sum(part_bytes(n) for n in stage.resident)
        own = sum(part_bytes(n) for n in stage.uses)
        stages.append(
            {
                "name": stage.name,
                "needed_by": stage.needed_by,
                "loaded": list(stage.resident),
                "weights_gb": loaded / GiB,
                "activations_gb": tr.peak / GiB,
                "peak": loaded + tr.peak,
                "peak_gb": (loaded + tr.peak) / GiB,
                "sequential_peak_gb": (own + tr.peak) / GiB,
            }
        )
    peak = max((s["peak"] for s in stages), default=0)
    return {
        "stages": stages,
        "peak_gb": peak / GiB,
        "sequential_peak_gb": max((s["sequential_peak_gb"] for s in stages), default=0.0),
        "part_weights_gb": {n: b / GiB for n, b in weights.items()},
    }
