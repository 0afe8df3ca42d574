"""What each model's rehearsal runs with: its config file (the preset plus the rehearsal's settings), its small
dataset, and the parts each command holds in memory at once (for the memory check before a command starts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

LABELS = {"zimage-turbo": "Z-Image-Turbo", "flux2-klein-4b": "FLUX.2-klein-4B"}
CAPTIONS = ["a photo of ohwx teapot on a wooden table", "ohwx teapot in a garden"]
PROMPT = "a photo of ohwx teapot on a beach"
# Parts loaded together at the most crowded moment of each command (the trainer's feature caching holds both
# encoders; its training holds the transformer and the training state instead: see the watchdog for that part).
TOGETHER = {
    "zimage-turbo": {
        "probe": ("text_encoder", "vlm", "vae"),  # the probe frees the encoders before the transformer loads
        "train": ("text_encoder", "vlm", "vae"),
        "sample": ("transformer", "vae"),
        "pipeline": ("transformer", "vae"),
    },
    "flux2-klein-4b": {
        "probe": ("text_encoder", "vae"),
        "train": ("text_encoder", "vae"),
        "sample": ("transformer", "vae"),
        "pipeline": ("transformer", "vae"),
    },
}


@dataclass
class Rehearsal:
    """The settings of one model's rehearsal (the same code path in --tiny and full mode)."""

    preset: str
    tiny: bool
    size: int
    steps: int = 3
    caption_tokens: int | None = None  # model.max_caption_tokens (None: the preset's)
    inference_steps: int | None = None  # model.inference_steps (None: the preset's; sets the roll-out length K)
    gpu_plan: bool = True  # also run `dopsd plan` as a user sees it (GPU target)

    @property
    def label(self) -> str:
        return LABELS[self.preset]

    def overrides(self) -> dict[str, Any]:
        model: dict[str, Any] = {"height": self.size, "width": self.size}
        if self.caption_tokens is not None:
            model["max_caption_tokens"] = self.caption_tokens
        if self.inference_steps is not None:
            model["inference_steps"] = self.inference_steps
        out: dict[str, Any] = {
            "model": model,
            "data": {"trigger_word": "ohwx", "buckets": False},
            "method": {"prior_prompts": [], "prior_weight": 0.0, "train_states": 0},
            # The presets' lr (1e-4 / 2e-5) moves a LoRA so little in 3 steps that the student's and the EMA
            # teacher's bf16 velocities can round to the same values: the velocity check could not tell a weight-
            # swap bug from rounding. 1e-3 changes neither time nor memory.
            "optim": {"lr": 1e-3},
            # Checkpointing on and every roll-out state trained: the heaviest step of the preset (what the
            # measured runs used; `auto` would turn checkpointing off on a CPU after a full plan).
            "train": {
                "max_steps": self.steps,
                "checkpoint_every": 1,
                "keep_checkpoints": 2,
                "device": "cpu",
                "gradient_checkpointing": True,
            },
            "sample": {"prompts": [PROMPT], "seeds": [0], "control_steps": 0, "health": False, "every": 0},
            "log": {"progress": False},
        }
        if self.tiny:  # the tiny architectures in float32, a small rank and context (as gpu_real_scale --tiny)
            # float32: the tiny LoRA moves the 8-bit images by a few levels only, about what bf16 rounding between
            # the pipeline and dopsd sample moves them on klein (measured 4-5/255 vs 6/255): in float32 the export
            # check has the power to tell the exported LoRA from none. The bf16 path is the full-size run's.
            model.update(teacher_max_tokens=64, dtype="float32")
            out["train"]["mixed_precision"] = "no"
            out["lora"] = {"rank": 4, "alpha": 8.0}
            out["optim"] = {"lr": 1e-2}
            out["train"]["threads"] = 1
        else:
            out["train"]["threads"] = 2  # both cores: this machine's large bf16 matmuls use them
        return out

    def write_config(self, work: Path, folders: dict[str, Any], run: Path) -> Path:
        """WORK/PRESET.yaml: the preset, the model folders, the dataset, the run folder and the settings."""
        data = self.overrides()
        data["preset"] = self.preset
        data["model"]["pretrained"] = folders["pretrained"]
        if folders.get("teacher_encoder"):
            data["model"]["teacher_encoder"] = folders["teacher_encoder"]
        data["data"]["path"] = str(write_dataset(work / f"data-{self.preset}", self.size))
        data["train"]["output_dir"] = str(run)
        data["cache"] = {"dir": str(work / "cache")}
        path = work / f"{self.preset}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def settings(self) -> dict[str, Any]:
        """What the JSON records of the settings."""
        o = self.overrides()
        return {
            "preset": self.preset,
            "resolution": [self.size, self.size],
            "steps": self.steps,
            "overrides": o,
            "notes": "the preset's own values otherwise (LoRA rank and alpha, dtype, mixed precision, gradient checkpointing, "
            "EMA decay, roll-out)",
        }


def write_dataset(folder: Path, size: int) -> Path:
    """Two smooth random images at the training size, each with a caption."""
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i, caption in enumerate(CAPTIONS):
        low = torch.rand(3, 4, 4, generator=g)
        arr = torch.nn.functional.interpolate(low[None], size=(size, size), mode="bilinear")[0]
        Image.fromarray((arr.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


def part_gib(folders: dict[str, Any], parts: tuple[str, ...]) -> float:
    return sum(folders["parts"][p]["bytes"] for p in parts if p in folders["parts"]) / 2**30
