"""`dopsd evaluate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from dopsd.tools.evaluate import REPORT_FILES, evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dopsd.commands.args import count, seed

    parser.add_argument("source", help="a dopsd run folder (its config.yaml and LoRA), a YAML config or a preset")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    parser.add_argument("--lora", type=Path, help="LoRA file (default: the run folder's)")
    parser.add_argument(
        "--unseen",
        action="append",
        help="an unseen prompt (repeatable); default: the model's own with data.trigger_word, none without one",
    )
    parser.add_argument("--seeds", type=seed, nargs="+", default=[0, 1], help="seeds per prompt (default 0 1)")
    parser.add_argument("--feature-model", help="local DINOv2/DINOv3/CLIP/SigLIP folder for DINO-D (default: pixels)")
    parser.add_argument("--clip-model", help="local CLIP/SigLIP folder for CLIP-S (default: skipped)")
    parser.add_argument("--control-steps", type=count(0), default=28, help="many-step control (0 = off; default 28)")
    parser.add_argument("--max-prompts", type=count(1), default=8, help="training pairs to evaluate (default 8)")
    parser.add_argument("--no-base", action="store_true", help="skip the model without the LoRA")
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: RUN/eval or ./eval); an earlier report "
        "there is replaced, a folder holding anything else is refused",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def main(args: argparse.Namespace) -> int:
    from dopsd.commands import args as cli_args
    from dopsd.config import load_config
    from dopsd.errors import RunFolderError, UsageError
    from dopsd.lora.trained import FULL_FILE, LORA_FILE, trained_meta
    from dopsd.tools.features import check_feature_folder

    # Every flag is checked here, before the dataset's images or any model load.
    run_dir, config_source = cli_args.run_source(args.source)
    config = load_config(config_source, args.overrides)
    weights = args.lora
    if weights is None and run_dir is not None:
        weights = next((run_dir / f for f in (LORA_FILE, FULL_FILE) if (run_dir / f).is_file()), None)
        if weights is None:
            raise RunFolderError(
                f"{run_dir} has no {LORA_FILE} or {FULL_FILE} (did the run finish?); to evaluate "
                f"the model without a LoRA give the config instead: dopsd eval {run_dir / 'config.yaml'}"
            )
    if weights is None and args.no_base:
        raise UsageError("nothing to evaluate: no LoRA (give a run folder or --lora) and --no-base")
    if weights is not None:
        trained_meta(Path(weights), config.model.family, "--lora" if args.lora is not None else "the run's weights")
    if args.feature_model is not None:
        check_feature_folder(args.feature_model, "--feature-model")
    if args.clip_model is not None:
        check_feature_folder(args.clip_model, "--clip-model", text=True)
    out = cli_args.output_folder("--out", args.out or ((run_dir or Path(".")) / "eval"), REPORT_FILES)
    device = cli_args.device("--device", args.device)
    report = evaluate(
        config,
        weights,
        out,
        args.unseen,
        args.seeds,
        args.feature_model,
        args.clip_model,
        args.control_steps,
        args.max_prompts,
        not args.no_base,
        device,
    )
    for variant in ("base", "lora"):
        if variant in report:
            print(variant, " ".join(f"{k}={v:.4f}" for k, v in report[variant].items()))
    print(f"wrote {out / 'eval.json'} and grids in {out}")
    return 0
