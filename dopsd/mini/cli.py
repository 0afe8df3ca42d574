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
        "--recipe",
        default=None,
        help="the recipe version (default: the shipped weights', mini-recipe-4: mini-recipe-3's base, then a context "
        "stage that teaches the in-context path to carry a tint; see dopsd/mini/recipe_config.py)",
    )
    rec.add_argument(
        "--base",
        default=None,
        help="mini-recipe-4: distil from this base.safetensors (an earlier run's) instead of pretraining one",
    )
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


def _given_base(path: Path, rc) -> tuple:
    """(DiT, encoder, provenance) of `--base`, refused unless it is a base of this recipe's network."""
    from dopsd.errors import DopsdError
    from dopsd.mini.adapter import build_from, weights_file
    from dopsd.mini.recipe import sha256

    if not rc.context_stage.iters:
        raise DopsdError(
            f"--base needs --recipe mini-recipe-4: {rc.version} distils from its float32 base, which no file holds, "
            "so a run from a stored base would not build its weights"
        )
    cfg, dit, enc, kind = build_from(path, "--base")
    file = weights_file(path)
    if kind != "base" or cfg != rc.model:
        problem = "is a turbo" if kind != "base" else "has another network configuration"
        raise DopsdError(
            f"--base: {file} {problem}; give the base.safetensors of an earlier `dopsd mini recipe` run with the "
            "same options, or leave --base out to pretrain one"
        )
    return dit, enc, {"file": str(file), "sha256": sha256(file)}


def main(args: argparse.Namespace) -> int:
    if args.action == "recipe":
        from dopsd.errors import DopsdError
        from dopsd.mini.recipe import run_recipe
        from dopsd.mini.recipe_config import SHIPPED_RECIPE, recipe_config

        try:  # the version is checked here, not by argparse: the versions live beside the recipe (torch)
            rc = recipe_config(args.recipe or SHIPPED_RECIPE, args.seed, tiny=args.tiny)
        except ValueError as err:
            raise DopsdError(f"--recipe {err}") from None
        rc.model = dataclasses.replace(rc.model, gate_input=args.gate_input)
        base = _given_base(Path(args.base), rc) if args.base else None
        start = time.time()
        manifest = run_recipe(rc, Path(args.out), log=lambda s: print(s, flush=True), base=base)
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
