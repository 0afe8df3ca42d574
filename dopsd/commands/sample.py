"""`dopsd sample`: a model ± a trained LoRA at a chosen step count, fixed seeds: one PNG grid, plus one PNG and one
JSON sidecar per (prompt, seed).

Seeding: the sample of prompt number i (counting from `--prompt-index`, default 0) with seed s starts from the
noise of `dopsd.core.sampler.sample_seed(s, i)` = (s + i × 0x9E3779B97F4A7C15) mod 2^63, and is sampled on its own
(batch 1, so neither its noise nor its pixels depend on the other prompts). So every prompt of a grid has its own
noise, the same (prompt, seed, steps, model, LoRA) gives the same image in any grid — a base model's grid and a
LoRA's (or 4 and 32 steps) compare sample by sample — and one sample is drawn again alone with
`--prompt TEXT --prompt-index i --seeds s` (its sidecar holds the exact command line).

Files: `--out DIR/NAME.png` is the grid (rows = prompts, columns = seeds); the samples go to `DIR/NAME/` as
`pII-SLUG-sSEED.png` + `.json` (II the prompt index, SLUG the prompt's first words). Existing files are never
replaced without --overwrite: the command stops before sampling and names the first file in the way.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import torch

from dopsd.core.sampler import generate, sample_seed, seed_noise
from dopsd.data.images import grid_image, to_pil
from dopsd.lora.trained import FULL_FILE, LORA_FILE, apply_trained, trained_meta

SLUG_CHARS = 40  # the prompt's first characters in a sample's file name
# What `sample_file` names, its sidecar, and the temporary name of either that a killed run may leave (dopsd.files).
SAMPLE_FILE = re.compile(r"^(p\d{2,}-[a-z0-9-]*-s\d+\.(png|json)|\.p\d{2,}-[a-z0-9-]*-s\d+\.(png|json)\.\d+\.tmp)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dopsd.commands.args import count, finite, seed

    parser.add_argument(
        "source",
        nargs="?",
        default="mini",
        help="a dopsd run folder (uses its config and LoRA), a YAML config or a preset (default mini)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value (e.g. model.pretrained=base)")
    parser.add_argument("--lora", type=Path, help="LoRA/weights file (default: the run folder's, if any)")
    parser.add_argument("--no-lora", action="store_true", help="sample the model without the run's LoRA")
    parser.add_argument("--lora-scale", type=finite, default=1.0, help="LoRA strength (default 1)")
    parser.add_argument(
        "--source",
        type=Path,
        action="append",
        dest="sources",
        help="editing models (model.editing): a source image every prompt edits (repeat for several sources)",
    )
    parser.add_argument("--steps", type=count(1), help="sampling steps (default: the model's few-step setting)")
    parser.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        help="a prompt (repeat for rows); default: the run's sample prompts",
    )
    parser.add_argument("--seeds", type=seed, nargs="+", default=[0, 1, 2, 3], help="seeds (grid columns)")
    parser.add_argument(
        "--prompt-index",
        type=count(0),
        default=0,
        help="number of the first prompt (default 0); a sample's noise depends on its seed and prompt "
        "number, so `--prompt P --prompt-index 3 --seeds 7` redraws the 4th prompt's seed-7 sample alone",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("samples.png"),
        help="output grid (default samples.png); each sample also goes to a folder of the same name "
        "without the extension (samples/pII-SLUG-sSEED.png + .json)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out and the sample files of the same names if they exist"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def main(args: argparse.Namespace) -> int:
    from dopsd.commands import args as cli_args
    from dopsd.config import load_config
    from dopsd.errors import RunFolderError, UsageError
    from dopsd.files import atomic_save_image, atomic_write_json
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
            raise RunFolderError(
                f"{run_dir} has no {LORA_FILE} or {FULL_FILE} (did the run finish?); pass --no-lora "
                "to sample the model without it"
            )
    field = "--lora" if args.lora is not None else "the run's weights"
    meta = trained_meta(Path(weights), config.model.family, field) if weights is not None else {}
    if args.lora_scale != 1.0 and (
        weights is None or meta.get("format") == "dopsd-full" or Path(weights).name == FULL_FILE
    ):
        raise UsageError(
            f"--lora-scale {args.lora_scale:g} scales a LoRA, but "
            + (f"{weights} holds full weights" if weights is not None else "no LoRA is loaded")
        )
    prompts = args.prompts or meta.get("prompts")  # default: the run's own sample prompts
    if not prompts and run_dir is not None:  # --no-lora on a run: still its prompts
        run_weights = next((run_dir / f for f in (LORA_FILE, FULL_FILE) if (run_dir / f).is_file()), None)
        prompts = trained_meta(run_weights).get("prompts") if run_weights is not None else None
    prompts = prompts or config.sample.prompts
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable)")
    out = cli_args.output_file("--out", args.out, args.overwrite)
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if repeated:
        raise UsageError(
            f"--seeds repeats {', '.join(map(str, repeated))}: a seed draws the same samples again; give each seed once"
        )
    first = args.prompt_index
    files = {(i, s): sample_file(out, first + i, prompts[i], s) for i in range(len(prompts)) for s in args.seeds}
    _check_sample_files(out, files.values(), args.overwrite)
    device = cli_args.device("--device", args.device)
    sources = source_images(args.sources, config.model)

    adapter = load_adapter(config.model, device, torch_dtype(config.model.dtype))
    m = config.model
    schedule = adapter.inference_schedule(m.height, m.width, args.steps or m.inference_steps)
    steps = len(schedule) - 1
    contexts = adapter.student_contexts(list(prompts), [sources] * len(prompts) if sources else None)
    # Every context is computed: the encoders go before the denoiser loads (on first use of adapter.network), so
    # the two never share the memory (a full-size text encoder and transformer together are ~20 GB in bf16).
    adapter.release_encoders()
    if weights is not None:
        apply_trained(adapter.network, Path(weights), args.lora_scale)
    shape = adapter.latent_shape(m.height, m.width)
    images = []
    for (i, s), path in files.items():  # one at a time: a sample never depends on the rest of the grid
        noise = seed_noise(shape, [sample_seed(s, first + i)])
        image = generate(adapter, adapter.network, [contexts[i]], noise, schedule, batch_size=1, dtype=torch.float32)
        atomic_save_image(path, to_pil(image)[0])
        atomic_write_json(path.with_suffix(".json"), sidecar(args, config, prompts[i], first + i, s, steps, weights))
        images.append(image)
    atomic_save_image(out, grid_image(torch.cat(images), len(prompts), len(args.seeds)))
    what = f"LoRA {weights}" if weights else "no LoRA"
    print(
        f"wrote {out}: {len(prompts)} prompts × {len(args.seeds)} seeds, {steps} steps, {m.family} ({what}); "
        f"each sample with its JSON in {out.with_suffix('')}/"
    )
    return 0


def source_images(paths: list[Path] | None, model: Any) -> list[Any]:
    """The --source images at the model's sampling size; refused for a model that takes none."""
    from dopsd.data.image_files import ImageRefused, load_image
    from dopsd.errors import UsageError

    if not paths:
        return []
    if not model.editing:
        raise UsageError(
            f"--source {paths[0]}: source images are for editing models; this {model.family} config has "
            "model.editing false (sample the editing run's folder, or pass model.editing=true for an editing LoRA)"
        )
    images = []
    for path in paths:
        try:
            images.append(load_image(Path(path), (model.height, model.width)))
        except (ImageRefused, OSError) as err:
            raise UsageError(f"--source {path}: cannot be used as a source image ({err}); give a PNG or JPEG") from None
    return images


def sample_file(out: Path, prompt_index: int, prompt: str, seed: int) -> Path:
    """Where the sample (prompt_index, seed) of the grid `out` goes: OUT_STEM/pII-SLUG-sSEED.png."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:SLUG_CHARS].strip("-") or "prompt"
    return out.with_suffix("") / f"p{prompt_index:02d}-{slug}-s{seed}.png"


def _check_sample_files(out: Path, files: Any, overwrite: bool) -> None:
    from dopsd.commands.args import _writable_folder
    from dopsd.errors import UsageError

    folder = out.with_suffix("")
    if folder.exists() and not folder.is_dir():
        raise UsageError(
            f"--out {out}: the samples go to the folder {folder}, but a file of that name exists; choose another --out"
        )
    strange = sorted(p.name for p in folder.iterdir() if not SAMPLE_FILE.match(p.name)) if folder.is_dir() else []
    if strange:  # e.g. `--out data.png` beside a dataset folder `data/`: never written into
        raise UsageError(
            f"--out {out}: the samples go to the folder {folder}, which holds files dopsd did not write there "
            f"({', '.join(strange[:3])}{' …' if len(strange) > 3 else ''}); dopsd puts its samples only in a folder "
            "of its own: choose another --out"
        )
    paths = [p for f in files for p in (f, f.with_suffix(".json"))]
    taken = [p for p in paths if p.exists()]
    if taken and not overwrite:
        raise UsageError(
            f"{taken[0]} already exists ({len(taken)} sample file(s) in the way); choose another --out, "
            "or pass --overwrite to replace them"
        )
    if folder.is_dir():
        _writable_folder("--out", folder, folder)


def sidecar(
    args: argparse.Namespace, config: Any, prompt: str, prompt_index: int, seed: int, steps: int, weights: Path | None
) -> dict[str, Any]:
    """What one sample was made from, and the command that draws it again alone."""
    command = ["dopsd", "sample", str(args.source), *args.overrides]
    command += ["--lora", str(args.lora)] if args.lora is not None else []
    command += ["--no-lora"] if args.no_lora else []
    command += ["--lora-scale", f"{args.lora_scale:g}"] if args.lora_scale != 1.0 else []
    command += [a for src in args.sources or [] for a in ("--source", str(src))]
    command += ["--steps", str(steps), "--prompt", prompt, "--prompt-index", str(prompt_index), "--seeds", str(seed)]
    return {
        "prompt": prompt,
        "prompt_index": prompt_index,
        "seed": seed,
        "noise_seed": sample_seed(seed, prompt_index),
        "steps": steps,
        "model": {
            "family": config.model.family,
            "pretrained": config.model.pretrained,
            "height": config.model.height,
            "width": config.model.width,
        },
        "lora": None if weights is None else str(Path(weights).resolve()),
        "lora_scale": args.lora_scale,
        "sources": [str(Path(src).resolve()) for src in args.sources or []],
        "reproduce": shlex.join(command),
    }
