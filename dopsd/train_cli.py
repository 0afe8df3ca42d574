"""`dopsd train CONFIG [section.key=value …] [--resume] [--overwrite]`."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  dopsd train mini data.path=./my_images train.output_dir=runs/concept
  dopsd train my_config.yaml optim.lr=2e-4 train.max_steps=1000
  dopsd train my_config.yaml --resume            # continue from the last checkpoint
  dopsd train my_config.yaml method.name=sft     # the SFT baseline
presets: mini, zimage-turbo, flux2-klein-4b, flux2-klein-9b; every key: docs/configuration.md
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("config", help="a YAML config file or a preset name")
    parser.add_argument("overrides", nargs="*", help="overrides like optim.lr=2e-4 (any key of the config)")
    parser.add_argument("--resume", action="store_true", help="continue the run in train.output_dir from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing train.output_dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def main(args: argparse.Namespace) -> int:
    from dopsd.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"dopsd train: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from dopsd.api import OutputExistsError, train
    from dopsd.data import DatasetError
    from dopsd.trainer import TrainingAborted

    try:
        train(config, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, DatasetError, OutputExistsError, FileNotFoundError) as err:
        print(f"dopsd train: {err}", file=sys.stderr)
        return 2
    except TrainingAborted as err:
        print(f"dopsd train: aborted: {err}", file=sys.stderr)
        return 3
    return 0
