"""The named presets: for each, a one-line description and the config keys it sets, only those that differ from
the defaults declared in dopsd.config (`dopsd.config.preset` applies one; docs/configuration.md lists them)."""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mini": (
        "Built-in miniature turbo (24×24, 4 steps, CPU).",
        {
            "model": {"family": "mini", "pretrained": "turbo", "height": 24, "width": 24},
            "lora": {"rank": 8, "alpha": 8.0},
            "optim": {"lr": 5e-4},
            "method": {"ema_decay": 0.999},
            "train": {"max_steps": 200, "batch_size": 8, "checkpoint_every": 100, "device": "cpu"},
            "sample": {"every": 100, "control_steps": 32},
        },
    ),
    "zimage-turbo": (
        "Z-Image-Turbo LoRA, the authors' recipe (8 steps shift 3, 4-step roll-out, rank 64).",
        {
            "model": {
                "family": "zimage",
                "teacher_context": "vlm",
                "height": 1024,
                "width": 1024,
                "inference_steps": 8,
                "shift": 3.0,
                "rollout_every": 2,
                "dtype": "bfloat16",
            },
            "data": {"buckets": True, "bucket_multiple": 64},
            "lora": {"rank": 64, "alpha": 128.0},
            "optim": {"lr": 1e-4},
            "train": {"max_steps": 2000, "mixed_precision": "bf16", "gradient_checkpointing": "auto"},
            "sample": {"every": 250, "control_steps": 28, "seeds": [0, 1]},
        },
    ),
    "flux2-klein-4b": (
        "FLUX.2-klein 4B LoRA: reference-image teacher, klein's 4-step dynamic-shift schedule.",
        {
            "model": {
                "family": "flux2",
                "teacher_context": "reference",
                "height": 1024,
                "width": 1024,
                "inference_steps": 4,
                "dtype": "bfloat16",
            },
            "data": {"buckets": True, "bucket_multiple": 64},
            "lora": {"rank": 64, "alpha": 128.0},
            "optim": {"lr": 2e-5},
            "train": {"max_steps": 3000, "mixed_precision": "bf16", "gradient_checkpointing": "auto"},
            "sample": {"every": 250, "control_steps": 28, "seeds": [0, 1]},
        },
    ),
}
PRESETS["flux2-klein-9b"] = ("FLUX.2-klein 9B LoRA (same recipe as 4B).", copy.deepcopy(PRESETS["flux2-klein-4b"][1]))
