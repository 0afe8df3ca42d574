"""`dopsd plan CONFIG [section.key=value ...] [--json]`: memory and compute of a run, before any download."""

from __future__ import annotations

import argparse
import json

import torch

from dopsd.planner.resident import QUANTIZE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", help="a YAML config or a preset name (mini, zimage-turbo, flux2-klein-4b, flux2-klein-9b)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for `dopsd train`")
    parser.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default=None,
        help="plan a quantized frozen base (default: model.quantize if the config has it, else none)",
    )
    parser.add_argument(
        "--caption-tokens",
        type=int,
        default=None,
        help="student caption length to plan for (default: model.max_caption_tokens, the longest)",
    )
    parser.add_argument(
        "--teacher-tokens",
        type=int,
        default=None,
        help="teacher context length for VLM teachers (default: 1024, the adapters' budget)",
    )
    parser.add_argument("--no-search", action="store_true", help="skip the search for settings that would fit")
    parser.add_argument(
        "--exact",
        action="store_true",
        help="measure the whole network instead of extrapolating from 2 and 3 blocks (slower)",
    )


def main(args: argparse.Namespace) -> int:
    from dopsd.config import ConfigError, load_config
    from dopsd.planner.plan import plan
    from dopsd.planner.report import text

    cfg = load_config(args.config, args.overrides)
    for flag, value in (("--caption-tokens", args.caption_tokens), ("--teacher-tokens", args.teacher_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.caption_tokens is not None:
        cfg.model.max_caption_tokens = args.caption_tokens
    if args.teacher_tokens is not None:
        cfg.model.teacher_max_tokens = args.teacher_tokens
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    result = plan(cfg, quantize=args.quantize, search=not args.no_search, exact=True if args.exact else None)
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 0
