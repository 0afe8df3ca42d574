"""The exported LoRA in the model's own diffusers pipeline, against `dopsd sample`'s image of the same prompt, seed
and steps: `pipe.load_lora_weights(EXPORT)`, sampled from the noise `dopsd sample` drew (its `sample_seed`), decoded
and rounded to 8 bits as `dopsd sample` writes its PNG; then again without the LoRA (`unload_lora_weights`), to
show how far the LoRA moves the image (the comparison's power).

    python benchmarks/full_size/pipeline.py --config RUN/config.yaml --lora EXPORT_DIR --png SAMPLE.png \
        --prompt TEXT --seed 0 --steps 8 --out result.json

Memory: the prompt is encoded by a pipeline holding only the tokenizer and text encoder, which is then freed, and
the transformer and VAE are loaded after it (so the text encoder and the transformer are never loaded together).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 2**30
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--config", "--lora", "--png", "--prompt", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args(argv)

    from diffusers import Flux2KleinPipeline, ZImagePipeline
    from PIL import Image

    from dopsd.config import load_config
    from dopsd.core.sampler import sample_seed, seed_noise
    from dopsd.data.images import to_tensor
    from dopsd.models.registry import plan_spec, torch_dtype

    started = time.perf_counter()
    m = load_config(args.config).model
    dtype = torch_dtype(m.dtype)
    zimage = m.family == "zimage"
    cls = ZImagePipeline if zimage else Flux2KleinPipeline
    load = dict(torch_dtype=dtype, local_files_only=True)
    text = cls.from_pretrained(m.pretrained, transformer=None, vae=None, **load)
    with torch.no_grad():
        if zimage:
            embeds, _ = text.encode_prompt(
                [args.prompt], device="cpu", do_classifier_free_guidance=False, max_sequence_length=m.max_caption_tokens
            )
        else:
            embeds, _ = text.encode_prompt([args.prompt], device="cpu", max_sequence_length=m.max_caption_tokens)
    del text
    gc.collect()
    pipe = cls.from_pretrained(m.pretrained, text_encoder=None, tokenizer=None, **load)
    pipe.load_lora_weights(args.lora)
    shape = plan_spec(m).latent_shape(m.height, m.width)
    noise = seed_noise(shape, [sample_seed(args.seed, 0)])  # prompt 0 of `dopsd sample --prompt TEXT`
    call = dict(
        prompt_embeds=embeds,
        height=m.height,
        width=m.width,
        num_inference_steps=args.steps,
        guidance_scale=0.0 if zimage else 1.0,  # turbo / distilled klein: no classifier-free guidance
        output_type="pt",
    )

    def eight_bits() -> torch.Tensor:  # as dopsd sample's PNG
        with torch.no_grad():
            images = pipe(**call, latents=noise.clone()).images
        return (images.float().clamp(0, 1) * 255).round() / 255

    theirs = eight_bits()
    ours = (to_tensor([Image.open(args.png).convert("RGB")]) + 1) / 2
    diff = (theirs - ours).abs()
    pipe.unload_lora_weights()  # the control: how far the LoRA moves the image, so the comparison has power
    effect = (eight_bits() - theirs).abs()
    result = {
        "pipeline": cls.__name__,
        "lora_loaded_with": "load_lora_weights",
        "steps": args.steps,
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "lora_effect_max_abs_diff": float(effect.max()),
        "lora_effect_mean_abs_diff": float(effect.mean()),
        "units": "pixel values in [0, 1], both images rounded to 8 bits",
        "image_std": float(ours.std()),
        "peak_rss_gib": peak_rss_gib(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
