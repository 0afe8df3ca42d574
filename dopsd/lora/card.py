"""A Hugging Face model card (README.md) for a LoRA file dopsd wrote: the YAML header the Hub reads (`base_model`,
`instance_prompt`, tags, `widget` samples) and a short text on what the LoRA is and how to load it.

The header follows what LoRA repositories on the Hub carry (diffusers' and kohya's trainers write the same keys),
so the Hub links the LoRA to its base model and shows the samples. Nothing is sent anywhere: the card is written
beside the file for the user to upload with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dopsd.lora.meta import LoraFacts

# The published bases dopsd trains (variant, from the transformer's size → Hub repository): `base_model` must name
# a repository, so a LoRA of another size gets none unless the user names it
HUB_IDS = {
    "Z-Image 6B": "Tongyi-MAI/Z-Image-Turbo",
    "FLUX.2-klein 4B": "black-forest-labs/FLUX.2-klein-4B",
    "FLUX.2-klein 9B": "black-forest-labs/FLUX.2-klein-9B",
}
FAMILY_TAGS = {"zimage": ["z-image"], "flux2": ["flux2", "flux2-klein"]}
METHODS = {
    "dopsd": "D-OPSD (on-policy self-distillation: the few-step student learns from its own roll-outs)",
    "sft": "supervised fine-tuning (the flow-matching loss on the training images)",
    "hybrid": "D-OPSD with a supervised term",
}
SAMPLES = 4  # sample images copied beside the card


def base_model_id(facts: LoraFacts) -> str | None:
    """The Hub repository of the LoRA's base model, when it is a published one."""
    return HUB_IDS.get(facts.variant or "")


def _yaml(value: Any) -> str:
    # JSON is valid YAML and quotes every string safely (colons, brackets, a trigger word such as "[V]")
    return json.dumps(value, ensure_ascii=False)


def card_text(
    facts: LoraFacts, weights_name: str, *, base_model: str | None = None, samples: list[tuple[str, str]] = ()
) -> str:
    """The README.md of a LoRA file `weights_name` (in the same folder). `samples`: (image path relative to the
    card, prompt) shown in the Hub's widget."""
    base = base_model or base_model_id(facts)
    tags = ["lora", "diffusers", "template:diffusion-lora", "dopsd", *FAMILY_TAGS.get(facts.family, [])]
    tags.append("image-to-image" if facts.editing else "text-to-image")
    header = [
        "---",
        f"library_name: {_yaml('diffusers')}",
        f"pipeline_tag: {_yaml('image-to-image' if facts.editing else 'text-to-image')}",
        "tags:",
        *[f"- {_yaml(t)}" for t in tags],
    ]
    if base:
        header.append(f"base_model: {_yaml(base)}")
    if facts.trigger_word:
        header.append(f"instance_prompt: {_yaml(facts.trigger_word)}")
    if samples:
        header.append("widget:")
        for path, prompt in samples:
            header += [f"- text: {_yaml(prompt)}", "  output:", f"    url: {_yaml(path)}"]
    header.append("---")
    title = facts.title or f"{facts.variant or facts.family} LoRA"
    method = METHODS.get(facts.method or "dopsd", facts.method or "dopsd")
    lines = [
        "",
        f"# {title}",
        "",
        f"A{'n editing' if facts.editing else ''} LoRA for {facts.variant or facts.family}"
        + (f" ([{base}](https://huggingface.co/{base}))" if base else "")
        + f", trained with dopsd by {method}.",
        "",
    ]
    if facts.trigger_word:
        lines += ["## Trigger word", "", f"Use `{facts.trigger_word}` in the prompt.", ""]
    if facts.editing:
        lines += [
            "## Editing",
            "",
            "Give the source image(s) to the pipeline and write the edit instruction as the prompt.",
            "",
        ]
    call = "pipe(prompt, image=source)" if facts.editing else "pipe(prompt)"
    lines += [
        "## Use",
        "",
        f"The file `{weights_name}` loads at strength 1 as trained (alpha / rank is folded into its weights):",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f"pipe = DiffusionPipeline.from_pretrained({_yaml(base or '<base model folder>')}, torch_dtype=torch.bfloat16)",
        f'pipe.load_lora_weights("<this repository or folder>", weight_name={_yaml(weights_name)})',
        f"image = {call}.images[0]",
        "```",
        "",
        "ComfyUI: put the file in `models/loras` and load it with a LoRA loader at strength 1.0.",
        "",
        "## Training",
        "",
        f"- method: {facts.method or 'dopsd'}",
        f"- rank {facts.rank}, alpha {facts.alpha:g}",
    ]
    if facts.steps is not None:
        lines.append(f"- steps: {facts.steps}")
    if facts.resolution:
        lines.append(f"- resolution: {facts.resolution[0]}x{facts.resolution[1]}")
    if facts.base_model:
        lines.append(f"- base model folder: {facts.base_model}")
    return "\n".join(header + lines) + "\n"


def run_samples(run: Path | None, limit: int = SAMPLES) -> list[Path]:
    """A run's sample grids of its trained LoRA (RUN/samples/final_*.png; step-0 grids show the base model)."""
    if run is None or not (run / "samples").is_dir():
        return []
    return sorted((run / "samples").glob("final*.png"))[:limit]
