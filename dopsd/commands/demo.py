"""`dopsd demo`: its arguments, parsed without loading torch (so `--help` answers at once); the demo itself is
dopsd.mini.demo."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/demo"),
        help="Output folder (default outputs/demo; an existing one is kept and a new -N folder used).",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Optimizer steps per method (default: the demo's 200, dopsd.mini.demo.STEPS).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data, training and evaluation noise.")
    parser.add_argument("--samples", type=int, default=64, help="Evaluation samples per prompt set.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the miniature's matrices are small, and more threads "
        "than free cores makes every step many times slower).",
    )
    parser.add_argument(
        "--pretrained",
        default="turbo",
        help="Mini weights: 'turbo' (shipped) or a folder written by `dopsd mini recipe`.",
    )


def main(args: argparse.Namespace) -> int:
    from dopsd.mini import demo

    return demo.main(args)
