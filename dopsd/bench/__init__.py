"""`dopsd bench`: D-OPSD against the SFT baselines on the built-in miniature world, with a report.

Kept light: the heavy modules (torch, the trainer, matplotlib) are imported inside `main`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="report folder (created; must be empty unless --overwrite)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="the short CPU configuration the README quotes (under 10 min on 2 idle cores)",
    )
    size.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration (tests)")
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=["concept_lora", "domain_full", "continual"],
        default=None,
        help="only these settings (default: all three)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only these methods (default: all; the report then lists what is missing)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="a `dopsd mini recipe` output folder to benchmark instead of the shipped miniature weights",
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of training seeds (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the preset's)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out (runs every job)")
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out with the same options: jobs whose result was saved "
        "are kept, the rest run",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dopsd.bench.run import ResumeMismatch, run_bench
    from dopsd.bench.settings import preset

    config = preset("tiny" if args.tiny else "quick" if args.quick else "full")
    config = config.override(settings=args.settings, methods=args.methods, seeds=args.seeds, steps=args.steps)
    if args.weights:
        import dataclasses

        from dopsd.mini.adapter import build_from

        folder = Path(args.weights)
        for kind in ("turbo", "base"):  # unreadable or foreign weights fail here, before any work
            build_from(folder / f"{kind}.safetensors", "--weights")
        config = dataclasses.replace(config, model=str(folder.resolve()))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        print(
            f"dopsd bench: {out} is not empty; choose another --out, pass --resume to continue the run in it, "
            "or --overwrite"
        )
        return 2
    try:
        summary = run_bench(config, out, resume=args.resume)
    except ResumeMismatch as err:
        print(f"dopsd {err}")
        return 2
    print(
        f"dopsd bench: wrote {out / 'report.md'}, {out / 'report.html'} and {out / 'results.json'} "
        f"in {summary['seconds']:.0f} s"
    )
    return 0
