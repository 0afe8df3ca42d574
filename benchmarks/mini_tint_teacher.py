"""Can more tint training make the miniature's teacher carry a domain?

The bench's domain claim can only be judged when D-OPSD's teacher (the model with a reference image in its
context) renders the held-out tint. This experiment continues a base's pretraining (the recipe's own loop,
`dopsd.mini.recipe.pretrain`, from the shipped base or `--init FILE`, with a fresh optimizer) with a larger share of
tint samples, part of them with references in the target's named colours (what D-OPSD's teacher sees: the
training image of the caption), and runs the tint teacher check (`dopsd.mini.domains`) at the base's 32 steps
on the shipped base and on the continued one, with both kinds of reference, and measures where the colour goes
wrong: the predicted clean image's background colour at several σ with the exact target image in context. The
held-out concept colours from context (what the recipe's in-context samples teach) are checked too. `--iters 0
--init FILE` only checks FILE.

    python benchmarks/mini_tint_teacher.py --out DIR [--iters 2000 --p-tint 0.5 --same-colours 1.0 --init FILE]

It writes DIR/base.safetensors with a manifest (`model.pretrained: DIR/base.safetensors` loads it) and
DIR/tint_check.json, and prints the tables. The shares and learning rate default to mini-recipe-4's context
stage (`dopsd.mini.recipe_config.ContextStage`), which is this continuation at 6,000 iterations with seed 1
from mini-recipe-3's base (`--init` that base: the shipped base already had the stage); about 20 minutes per
2,000 iterations on one idle CPU core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from dopsd.errors import DopsdError
from dopsd.files import atomic_save_safetensors, atomic_write_json
from dopsd.mini import domains, report, world
from dopsd.mini import metrics as M
from dopsd.mini.adapter import WEIGHTS_DIR, MiniAdapter, build_from, load
from dopsd.mini.recipe import half_state, pretrain, sha256
from dopsd.mini.recipe_config import ContextStage, RecipeConfig, stage_config


def check(adapter: MiniAdapter, n: int, seed: int) -> dict[str, dict[str, float]]:
    """The tint check's pass rate (mean, min, max over the test tints) and median hue error per reference kind
    and context path, the per-tint numbers, and the held-out concept colours' fidelity per path."""
    out: dict[str, dict[str, float]] = {}
    for refs, same in (("other scene", False), ("same colours", True)):
        res = domains.teacher_check(adapter, seed, n, steps=adapter.default_steps, same_colours=same)
        for path in ("vlm", "reference"):
            rates = [v for k, v in res.items() if k.endswith(f":caption+image({path})")]
            hue = [v for k, v in res.items() if k.endswith(f":caption+image({path}):hue_err")]
            out[f"{refs}, {path}"] = {
                "mean": statistics.fmean(rates),
                "min": min(rates),
                "max": max(rates),
                "median_hue_err": statistics.median(hue),
            }
        out[f"{refs}: per tint"] = res
    # the in-context ability the recipe trained first: held-out concept colours from the target image
    concepts = report.teacher_check(adapter, seed, n)
    for path in ("vlm", "reference"):
        out[f"concept colours, {path}"] = {
            "fidelity": statistics.fmean(v for k, v in concepts.items() if k.endswith(f"caption+image({path})"))
        }
    return out


SIGMAS = (0.95, 0.8, 0.6, 0.2)


@torch.no_grad()
def prediction_error(adapter: MiniAdapter, n: int, seed: int) -> dict[str, list[float]]:
    """Where the colour goes wrong: the median chroma error (RGB minus its grey part, in [0, 1] units) of the
    predicted clean image's background at each σ of SIGMAS, for sepia scenes with the *exact* target image in
    context (both paths), against the caption-only prediction of the same scenes untinted (named colours)."""
    targets, _ = domains.tint_pairs(world.DOMAIN_TINT, n, seed)
    captions = [t.caption() for t in targets]
    tinted, plain = world.render(targets), world.render([replace(t, tint=None) for t in targets])
    noise = torch.randn(tinted.shape, generator=torch.Generator().manual_seed(seed))
    out: dict[str, list[float]] = {}
    for name, image, context in (
        ("caption only, untinted", plain, None),
        ("exact image in context (vlm)", tinted, "vlm"),
        ("exact image in context (reference)", tinted, "reference"),
    ):
        decoded = M.decode(image)
        _, truth, _, _ = M.region_colours(image, decoded)
        if context is None:
            ctx = adapter.student_contexts(captions)
        else:
            adapter.teacher_context = context
            ctx = adapter.teacher_contexts_from_tensors(captions, image)
        batch = adapter.collate(ctx)
        out[name] = []
        for sigma in SIGMAS:
            x0 = adapter.network((1 - sigma) * image + sigma * noise, torch.full((n,), sigma), **batch)
            _, bg, _, _ = M.region_colours(x0, decoded)
            err = bg - truth
            out[name].append(float((err - err.mean(-1, keepdim=True)).norm(dim=-1).median()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--iters", type=int, default=2000)
    stage = ContextStage()
    ap.add_argument("--lr", type=float, default=stage.lr)
    ap.add_argument("--p-tint", type=float, default=stage.p_tint)
    ap.add_argument("--p-incontext", type=float, default=stage.p_incontext)
    ap.add_argument("--same-colours", type=float, default=stage.p_tint_same_colours)
    ap.add_argument("--samples", type=int, default=64, help="samples per tint and condition")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--init",
        type=Path,
        help="continue this base.safetensors (this script's or `dopsd mini recipe`'s) instead of the shipped base",
    )
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"mini_tint_teacher: {args.out} exists; choose a new --out folder")
    torch.set_num_threads(1)
    start = args.init or WEIGHTS_DIR / "base.safetensors"
    # the recipe's context stage with these options (its seed is the recipe's + 1)
    given = replace(
        stage,
        iters=args.iters,
        lr=args.lr,
        p_incontext=args.p_incontext,
        p_tint=args.p_tint,
        p_tint_same_colours=args.same_colours,
    )
    rc = stage_config(RecipeConfig(seed=args.seed - 1, context_stage=given))
    try:
        _, dit, enc, _ = build_from(start, "--init")
    except DopsdError as err:  # a missing or foreign --init: its message names the file and the fix
        raise SystemExit(f"mini_tint_teacher: {err}") from None
    t0 = time.time()
    dit, enc = pretrain(rc, init=(dit, enc), log=lambda line: print(line, flush=True))
    args.out.mkdir(parents=True)
    atomic_save_safetensors(args.out / "base.safetensors", half_state(dit, enc))
    shipped = json.loads((WEIGHTS_DIR / "manifest.json").read_text())
    manifest = {k: shipped[k] for k in ("recipe_version", "config", "torch")}  # not the shipped build's history
    manifest.update(
        continued_from={"file": str(start), "sha256": sha256(start)},
        recipe=rc.to_dict(),
        sha256={"base.safetensors": sha256(args.out / "base.safetensors")},
        wall_time_s={"base": round(time.time() - t0, 1)},
        command="python benchmarks/mini_tint_teacher.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
    )
    atomic_write_json(args.out / "manifest.json", manifest)
    bases = {
        "shipped base": load(SimpleNamespace(pretrained="base")),
        "continued base": load(SimpleNamespace(pretrained=str(args.out / "base.safetensors"))),
    }
    results = {name: check(adapter, args.samples, args.seed) for name, adapter in bases.items()}
    errors = {name: prediction_error(adapter, args.samples, args.seed) for name, adapter in bases.items()}
    atomic_write_json(args.out / "tint_check.json", {"check": results, "prediction_error": errors})
    print(
        f"\nTint teacher check at 32 steps ({args.samples} samples per tint; pass rate mean [min–max] over the "
        f"{len(domains.TEST_TINTS)} test tints; median hue error):\n"
    )
    print("| base | reference | vlm path | reference path |\n|---|---|---|---|")
    for name, res in results.items():
        for refs in ("other scene", "same colours"):
            cells = [res[f"{refs}, {p}"] for p in ("vlm", "reference")]
            text = [f"{c['mean']:.2f} [{c['min']:.2f}–{c['max']:.2f}], {c['median_hue_err']:.0f}°" for c in cells]
            print(f"| {name} | {refs} | {text[0]} | {text[1]} |")
    print("\nHeld-out concept colours from the target image in context (fidelity, mean over the concepts):\n")
    for name, res in results.items():
        vlm, ref = (res[f"concept colours, {p}"]["fidelity"] for p in ("vlm", "reference"))
        print(f"- {name}: vlm {vlm:.2f}, reference {ref:.2f}")
    print(
        f"\nBackground chroma error of the predicted clean image, sepia scenes, at σ = {', '.join(map(str, SIGMAS))}:\n"
    )
    print("| base | condition | " + " | ".join(f"σ={s}" for s in SIGMAS) + " |\n|---|---|" + "---|" * len(SIGMAS))
    for name, rows in errors.items():
        for cond, values in rows.items():
            print(f"| {name} | {cond} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
