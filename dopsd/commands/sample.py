"""`dopsd sample`: a model ± a trained LoRA at a chosen step count, fixed seeds, one PNG grid.

Rows are prompts, columns are seeds; the noise of a column is the same for every row and every step count,
so grids of a base model and of a LoRA (or of 4 and 32 steps) compare sample by sample.
"""

from __future__ import annotations

import argparse
from dopsd.images import grid_image
from dopsd.lora.trained import FULL_FILE, LORA_FILE, apply_trained, trained_meta
from dopsd.sampler import generate, seed_noise
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dopsd.commands.args import count, finite, seed

    parser.add_argument("source", nargs="?", default="mini",
                        help="a dopsd run folder (uses its config and LoRA), a YAML config or a preset (default mini)")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value (e.g. model.pretrained=base)")
    parser.add_argument("--lora", type=Path, help="LoRA/weights file (default: the run folder's, if any)")
    parser.add_argument("--no-lora", action="store_true", help="sample the model without the run's LoRA")
    parser.add_argument("--lora-scale", type=finite, default=1.0, help="LoRA strength (default 1)")
    parser.add_argument("--steps", type=count(1), help="sampling steps (default: the model's few-step setting)")
    parser.add_argument("--prompt", action="append", dest="prompts", help="a prompt (repeat for rows); "
                        "default: the run's sample prompts")
    parser.add_argument("--seeds", type=seed, nargs="+", default=[0, 1, 2, 3], help="seeds (grid columns)")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="output image (default samples.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def main(args: argparse.Namespace) -> int:
    from dopsd.commands import args as cli_args
    from dopsd.config import load_config
    from dopsd.errors import RunFolderError, UsageError
    from dopsd.files import atomic_save_image
    from dopsd.models.registry import load_adapter, torch_dtype

    # Every flag is checked here, before the model loads.
    run_dir, config_source = cli_args.run_source(args.source)
    config = load_config(config_source, args.overrides)
    if args.lora is not None and args.no_lora:
        raise UsageError("--lora and --no-lora contradict each other; give one of them")
    weights = args.lora
    if weights is None and run_dir is not None and not args.no_lora:
        weights = next((run_dir / f for f in (LORA_FILE, FULL_FILE) if (run_dir / f).is_file()), None)
        if weights is None:
            raise RunFolderError(f"{run_dir} has no {LORA_FILE} or {FULL_FILE} (did the run finish?); pass --no-lora "
                                 "to sample the model without it")
    field = "--lora" if args.lora is not None else "the run's weights"
    meta = trained_meta(Path(weights), config.model.family, field) if weights is not None else {}
    if args.lora_scale != 1.0 and (weights is None or meta.get("format") == "dopsd-full" or Path(weights).name == FULL_FILE):
        raise UsageError(f"--lora-scale {args.lora_scale:g} scales a LoRA, but "
                         + (f"{weights} holds full weights" if weights is not None else "no LoRA is loaded"))
    prompts = args.prompts or meta.get("prompts")  # default: the run's own sample prompts
    if not prompts and run_dir is not None:  # --no-lora on a run: still its prompts
        run_weights = next((run_dir / f for f in (LORA_FILE, FULL_FILE) if (run_dir / f).is_file()), None)
        prompts = trained_meta(run_weights).get("prompts") if run_weights is not None else None
    prompts = prompts or config.sample.prompts
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable)")
    out = cli_args.output_file("--out", args.out, args.overwrite)
    device = cli_args.device("--device", args.device)

    adapter = load_adapter(config.model, device, torch_dtype(config.model.dtype))
    if weights is not None:
        apply_trained(adapter.network, Path(weights), args.lora_scale)
    m = config.model
    schedule = adapter.inference_schedule(m.height, m.width, args.steps or m.inference_steps)
    steps = len(schedule) - 1
    contexts = adapter.student_contexts(list(prompts), None)
    rows = [c for c in contexts for _ in args.seeds]
    noise = seed_noise(adapter.latent_shape(m.height, m.width), list(args.seeds) * len(prompts))
    images = generate(adapter, adapter.network, rows, noise, schedule, dtype=torch.float32)
    atomic_save_image(out, grid_image(images, len(prompts), len(args.seeds)))
    what = f"LoRA {weights}" if weights else "no LoRA"
    print(f"wrote {out}: {len(prompts)} prompts × {len(args.seeds)} seeds, {steps} steps, {m.family} ({what})")
    return 0
