"""`dopsd` command line: one subcommand per module, imported only when used (keeps `--help` fast)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module implementing `add_arguments(parser)` and `main(args) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dopsd.demo", "Fine-tune the built-in miniature turbo on a concept with D-OPSD and SFT; compare."),
    "train": ("dopsd.train_cli", "Fine-tune a step-distilled model on image-caption pairs (D-OPSD or SFT)."),
    "sample": ("dopsd.sample", "Generate an image grid with a model +- LoRA at a chosen step count."),
    "export": ("dopsd.export", "Convert a trained LoRA to diffusers or ComfyUI format."),
    "eval": ("dopsd.evaluate", "Evaluate a trained LoRA (few-step samples, DINO/CLIP metrics, grids)."),
    "probe": ("dopsd.probe", "Check before training that the teacher context carries each training pair."),
    "bench": ("dopsd.bench", "Benchmark D-OPSD against SFT baselines on the miniature world."),
    "mini": ("dopsd.mini.cli", "Miniature world: rebuild the shipped weights (recipe) or measure them (report)."),
}


def build_parser(name: str) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"dopsd {name}", description=help_text)
    importlib.import_module(module_name).add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: dopsd COMMAND [options]   (dopsd COMMAND --help for a command's options)\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<8} {help_text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ndopsd: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    args = build_parser(argv[0]).parse_args(argv[1:])
    return int(importlib.import_module(COMMANDS[argv[0]][0]).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
