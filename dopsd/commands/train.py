"""`dopsd train CONFIG [section.key=value …] [--resume] [--overwrite]`."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  dopsd train mini data.path=./my_images train.output_dir=runs/concept
  dopsd train my_config.yaml optim.lr=2e-4 train.max_steps=1000
  dopsd train my_config.yaml --resume            # continue from the last checkpoint
  dopsd train my_config.yaml --resume train.max_steps=2000   # overrides may come before or after the flags
  dopsd train my_config.yaml method.name=sft     # the SFT baseline
presets: mini, zimage-turbo, flux2-klein-4b, flux2-klein-9b; every key: docs/configuration.md
exit codes: 0 ok; 2 bad input or a refused start (nothing written); 3 aborted (non-finite steps);
  4 unhealthy (finished, but the model is broken); summary.json in the run folder records the status;
  5 the machine (disk full, permissions, memory; the checkpoints are intact, the message says how to resume);
  130 / 143 stopped by Ctrl-C / SIGTERM after finishing the step and writing a checkpoint (--resume continues;
  a second Ctrl-C stops at once); all in dopsd/errors.py
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("config", help="a YAML config file or a preset name")
    parser.add_argument("overrides", nargs="*", help="overrides like optim.lr=2e-4 (any key of the config)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in train.output_dir from its last checkpoint"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start anew in train.output_dir: an earlier dopsd run there is moved aside to "
        "OUTPUT.replaced-DATE-TIME (never deleted)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # Overrides after a flag (`CONFIG --resume optim.lr=…`): plain parse_args would reject them as unrecognised.
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def main(args: argparse.Namespace) -> int:
    """Errors are DopsdErrors (dopsd.cli prints their message and returns their exit code)."""
    from dopsd.config import load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if config.train.gradient_checkpointing == "auto":  # decided with the plan for this GPU (config.yaml records it)
        from dopsd.planner.auto import resolved

        config, why = resolved(config)
        print(f"dopsd train: gradient checkpointing {why}", flush=True)
    from dopsd.training.api import train

    train(config, resume=args.resume, overwrite=args.overwrite)
    return 0
