"""`dopsd export`."""

from __future__ import annotations

import argparse

from dopsd.lora.files import DEFAULT_DTYPE, DTYPES, RUN_CONFIG, RUN_LORA
from dopsd.tools.export import CARD_NAME, FAMILIES, FORMATS, WEIGHTS_NAME, export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "lora",
        help=f"a dopsd run folder ({RUN_LORA} + {RUN_CONFIG}), a folder with {WEIGHTS_NAME}, "
        "or a LoRA .safetensors file",
    )
    parser.add_argument("--out", required=True, help="output .safetensors file, or a folder to write into")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="comfyui",
        help="comfyui: one file named after the run; diffusers: FOLDER/pytorch_lora_weights.safetensors "
        "(same keys: both load in diffusers and ComfyUI)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=DEFAULT_DTYPE,
        help=f"tensor dtype of the file (default {DEFAULT_DTYPE}; fp32 is twice the size and comes from the float32 "
        "weights of the run's last checkpoint)",
    )
    parser.add_argument(
        "--model",
        choices=FAMILIES,
        default=None,
        help="model family; checked against the file's module names (default: from them)",
    )
    parser.add_argument(
        "--alpha", type=float, default=None, help="LoRA alpha, only for bare peft files that record none"
    )
    parser.add_argument("--title", default=None, help="title shown by UIs (default: the run folder's name)")
    parser.add_argument("--trigger-word", default=None, help="trigger word to record (default: the run's, if any)")
    parser.add_argument(
        "--model-card",
        action="store_true",
        help=f"also write a Hugging Face model card ({CARD_NAME}: base model, trigger word, tags, the run's samples "
        "in images/) beside the file, to publish the LoRA on the Hub",
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="the model card's base_model: the Hub repository of the base (default: the published model the "
        "LoRA's shapes identify, e.g. black-forest-labs/FLUX.2-klein-4B)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file (and model card)")


def main(args: argparse.Namespace) -> int:
    written = export(
        args.lora,
        args.out,
        args.format,
        args.model,
        args.alpha,
        args.dtype,
        title=args.title,
        trigger_word=args.trigger_word,
        overwrite=args.overwrite,
        model_card=args.model_card,
        base_model=args.base_model,
    )
    print(f"wrote {written} ({args.dtype}; loads in diffusers and ComfyUI at strength 1)")
    if args.model_card:
        print(f"wrote {written.parent / CARD_NAME} (Hugging Face model card)")
    return 0
