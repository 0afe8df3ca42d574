"""`dopsd probe`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dopsd.tools.probe.run import PROBE_FILES, Thresholds, load_setup, probe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dopsd.commands.args import count, fraction

    parser.add_argument("config", help="the training config (YAML or preset name) that `dopsd train` would use")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for `dopsd train`")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: <train.output_dir>_probe); "
        "an earlier probe there is replaced, a folder holding anything else is refused",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when more than --max-fail of the pairs fail")
    parser.add_argument(
        "--max-fail", type=fraction, default=Thresholds.max_fail, help="fraction of failing pairs allowed"
    )
    parser.add_argument("--carry", type=fraction, default=Thresholds.carry, help="relative gain for 'carries'")
    parser.add_argument("--weak", type=fraction, default=Thresholds.weak, help="relative gain below which a pair fails")
    parser.add_argument("--seeds", type=count(1), default=3, help="seeds per pair")
    parser.add_argument(
        "--steps", type=count(1), default=None, help="sampling steps (default: the model's few-step setting)"
    )
    parser.add_argument("--features", default=None, help="local folder of an image-feature model (DINOv2/CLIP/SigLIP)")
    parser.add_argument("--limit", type=count(1), default=None, help="probe only the first N pairs")


def main(args: argparse.Namespace) -> int:
    """Exit 0 when the probe ran (and, with --strict, passed); 1 when --strict fails; 2 on bad input."""
    from dopsd.commands.args import output_folder
    from dopsd.config import load_config
    from dopsd.errors import UsageError
    from dopsd.files import atomic_write_json
    from dopsd.tools.features import check_feature_folder
    from dopsd.tools.probe.scorers import scorer_for

    # Flags first, then the dataset (load_setup checks it in full), then the models.
    if args.weak > args.carry:
        raise UsageError(
            f"--weak {args.weak:g} is above --carry {args.carry:g}; a pair fails below --weak and carries "
            "from --carry up, so --weak must be <= --carry"
        )
    thresholds = Thresholds(args.carry, args.weak, max_fail=args.max_fail)
    if args.features is not None:
        check_feature_folder(args.features, "--features")
    cfg = load_config(args.config, args.overrides)
    out = output_folder("--out", args.out or Path(f"{cfg.train.output_dir.rstrip('/')}_probe"), PROBE_FILES)
    setup = load_setup(cfg, limit=args.limit)
    scorer = scorer_for(setup.adapter, args.features, device=setup.adapter.device)
    steps = args.steps or cfg.model.inference_steps
    report = probe(
        setup.adapter,
        setup.pairs,
        seeds=range(args.seeds),
        steps=steps,
        scorer=scorer,
        thresholds=thresholds,
        names=setup.names,
        sources=setup.sources,
        release_encoders=True,  # the denoiser then loads alone (a full-size model's parts do not fit together)
    )
    data = report.to_dict()
    data["config"] = str(args.config)
    atomic_write_json(out / "probe.json", data)
    report.save_grid(out / "probe_grid.png")
    c = report.counts()
    print(
        f"teacher probe: {len(report.pairs)} pairs × {len(report.seeds)} seeds at {report.steps} steps, "
        f"metric {report.metric}, teacher context {report.teacher_context}"
    )
    print(report.table())
    print(
        f"\n{c['carries']} carry, {c['weak']} weak, {c['fails']} fail "
        f"(carries: relative gain ≥ {thresholds.carry} and teacher closer in ≥ {thresholds.min_win:.0%} of seeds; "
        f"fails: < {thresholds.weak})"
    )
    for line in data["recommendations"]:
        print(f"- {line}")
    print(f"wrote {out / 'probe.json'} and {out / 'probe_grid.png'}")
    if args.strict and not report.passed:
        print(
            f"dopsd probe --strict: {report.fail_fraction:.0%} of pairs fail (> {thresholds.max_fail:.0%} allowed)",
            file=sys.stderr,
        )
        return 1
    return 0
