"""`dopsd caption`."""

from __future__ import annotations

import argparse
from pathlib import Path

from dopsd.commands import args as cli_args
from dopsd.tools.caption import (
    DEFAULT_IMAGE_TOKENS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PROMPT,
    caption_folder,
    check_trigger_word,
    plan_captions,
    summary,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="dataset folder: images, some or none with a same-name .txt caption")
    parser.add_argument(
        "--vlm",
        required=True,
        help="local Qwen3-VL folder (e.g. Qwen3-VL-4B-Instruct, the model.teacher_encoder of Z-Image and FLUX.2)",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="what the VLM is asked about each image")
    parser.add_argument(
        "--max-new-tokens",
        type=cli_args.count(1),
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"longest caption, in tokens (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--trigger-word",
        default=None,
        help="word naming the concept, put before each new caption that lacks it (as data.trigger_word does)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing captions too (default: keep them)")
    parser.add_argument(
        "--image-tokens",
        type=cli_args.count(4),
        default=DEFAULT_IMAGE_TOKENS,
        help=f"most image tokens per image; larger images are scaled down (default {DEFAULT_IMAGE_TOKENS})",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def main(args: argparse.Namespace) -> int:
    """Exit 0 when every image that needed a caption was given one (or none needed one); 2 on bad input."""
    import torch

    # Every input is checked before the VLM loads.
    check_trigger_word(args.trigger_word)
    plan = plan_captions(args.folder, args.vlm, args.overwrite)
    device = cli_args.device("--device", args.device)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if plan.todo:
        print(f"captioning {len(plan.todo)} image(s) with {plan.vlm} on {device} (greedy, so reruns agree)")
    result = caption_folder(
        plan,
        device,
        dtype,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        trigger_word=args.trigger_word,
        image_tokens=args.image_tokens,
        progress=lambda name, text: print(f"  {name}: {text}", flush=True),
    )
    print(summary(result, args.folder))
    if result.written:
        print("read and edit the .txt files before training: each line of one is a separate caption")
    return 0
