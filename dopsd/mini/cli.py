"""`dopsd mini recipe` (rebuild the shipped weights) and `dopsd mini report` (measure them)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    rec = sub.add_parser("recipe", help="pretrain the base and distil the 4-step turbo (fixed seeds)")
    rec.add_argument("--out", required=True, help="folder for base/turbo .safetensors and manifest.json")
    rec.add_argument("--tiny", action="store_true", help="tiny model and a few steps (seconds; for tests)")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument(
        "--gate-input",
        choices=["rgb", "luma_highpass"],
        default="luma_highpass",
        help="what the DiT's per-pixel gate passes on (shipped weights: luma_highpass; rgb = mini-recipe-2's; "
        "see dopsd/mini/nets.py)",
    )
    rep = sub.add_parser("report", help="measure turbo and base: attributes, few-step quality, teacher check")
    rep.add_argument("--seeds", type=int, default=2)
    rep.add_argument("--samples", type=int, default=256, help="unrelated prompts per seed")
    rep.add_argument("--weights", default=None, help="a recipe output folder (default: the shipped weights)")
    rep.add_argument("--out", default=None, help="write the markdown table here (and the numbers as .json)")
    rep.add_argument(
        "--no-premise", action="store_true", help="skip the SFT vs D-OPSD runs (the premise; several minutes per seed)"
    )
    rep.add_argument(
        "--premise-steps", type=int, default=None, help="optimizer steps of those runs (default: the demo's)"
    )


def main(args: argparse.Namespace) -> int:
    if args.action == "recipe":
        from dopsd.mini.recipe import RecipeConfig, run_recipe, tiny_recipe

        rc = tiny_recipe(args.seed) if args.tiny else RecipeConfig(seed=args.seed)
        rc.model = dataclasses.replace(rc.model, gate_input=args.gate_input)
        start = time.time()
        manifest = run_recipe(rc, Path(args.out), log=lambda s: print(s, flush=True))
        print(f"wrote {args.out}/{{base,turbo}}.safetensors and manifest.json in {time.time() - start:.0f}s")
        print("wall time (s):", manifest["wall_time_s"])
        return 0
    if args.action == "report":
        from dopsd.mini.report import run_report

        if args.seeds < 1 or args.samples < 8:
            print("dopsd mini report: --seeds must be >= 1 and --samples >= 8", file=sys.stderr)
            return 2
        print(
            run_report(args.seeds, args.samples, args.weights, args.out, not args.no_premise, args.premise_steps),
            end="",
        )
        return 0
    return 2
