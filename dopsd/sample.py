"""`dopsd sample`: a model ± a trained LoRA at a chosen step count, fixed seeds, one PNG grid.

Rows are prompts, columns are seeds; the noise of a column is the same for every row and every step count,
so grids of a base model and of a LoRA (or of 4 and 32 steps) compare sample by sample.
Also the grid helpers the trainer uses for its interval samples.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from dopsd.schedules import sample_euler

LORA_FILE, LORA_CONFIG, FULL_FILE = "lora.safetensors", "lora_config.json", "model.safetensors"


def seed_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """One fixed noise per seed (float32, CPU), independent of batch composition and device."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate(
    adapter: Any,
    network: torch.nn.Module,
    contexts: list[dict[str, torch.Tensor]],
    noise: torch.Tensor,
    schedule: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Euler samples for per-sample `contexts` from `noise`; decoded images (B, 3, H, W) in [-1, 1] on CPU.
    Latents are float32 unless `dtype` says otherwise (adapters cast to their weights' dtype inside)."""
    device, dtype = device or next(network.parameters()).device, dtype or torch.float32
    was_training = network.training
    network.eval()
    out = []
    try:
        for start in range(0, len(contexts), batch_size):
            ctx = adapter.collate([{k: v.to(device) for k, v in c.items()} for c in contexts[start : start + batch_size]])
            x = noise[start : start + batch_size].to(device, dtype)
            x = sample_euler(lambda z, s, c: adapter.velocity(network, z, s, c), x, schedule.to(device), ctx)
            out.append(adapter.decode(x).float().cpu())
    finally:
        network.train(was_training)
    return torch.cat(out)


def grid_image(images: torch.Tensor, rows: int, cols: int, pad: int = 2) -> Image.Image:
    """A rows×cols grid of images (B, 3, H, W) in [-1, 1], row-major."""
    if len(images) != rows * cols:
        raise ValueError(f"grid of {rows}×{cols} needs {rows * cols} images, got {len(images)}")
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    h, w = arr.shape[1:3]
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    grid = Image.fromarray(canvas)
    if max(h, w) < 128:  # tiny models: upscale so the grid is viewable
        scale = max(1, 128 // max(h, w))
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid


# --- trained weights -----------------------------------------------------------------------------
def save_trained(out: Path, network: torch.nn.Module, lora: dict[str, Any] | None, meta: dict[str, Any], *,
                 dtype: str | None = None) -> Path:
    """The trained weights of a run (atomically) + lora_config.json; returns the weights file.

    LoRA: `lora.safetensors`. Z-Image / FLUX.2: the interchange layout (dopsd.lora_layout) that diffusers and
    ComfyUI load as trained, bf16 unless `dtype` ("bf16" | "fp16" | "fp32") says otherwise; the miniature: bare peft
    keys, float32, labelled dopsd-only. `lora` = {rank, alpha, targets}; `meta` = run facts (family, model config
    dict, method, steps, prompts, and optionally trigger_word and title) kept in lora_config.json and in the file's
    metadata (dopsd.lora_meta). Full fine-tune (`lora` None): `model.safetensors`, the network's state dict.
    """
    from dopsd.files import atomic_save_safetensors, atomic_write_json
    from dopsd.lora_files import DEFAULT_DTYPE, network_family, write_network
    from dopsd.lora_layout import LAYOUTS, LoraFileError
    from dopsd.lora_meta import LAYOUT_INTERCHANGE, LAYOUT_PEFT, run_facts

    out = Path(out)
    if lora is None:
        state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
        atomic_save_safetensors(out / FULL_FILE, state, {"format": "pt", "dopsd": json.dumps({"layout": "dopsd-full"})})
        atomic_write_json(out / LORA_CONFIG, {"format": "dopsd-full", **meta})
        return out / FULL_FILE
    family = meta.get("family") or network_family(network) or "mini"
    facts = run_facts(family, network, lora, meta, title=out.resolve().name)
    layout = LAYOUT_INTERCHANGE if family in LAYOUTS else LAYOUT_PEFT
    try:
        written = write_network(out / LORA_FILE, network, facts, dtype or (DEFAULT_DTYPE if family in LAYOUTS else "fp32"),
                                layout=layout)
    except LoraFileError as err:
        if layout == LAYOUT_PEFT:
            raise
        # never lose a finished run's weights: keep them in dopsd's own layout and say what other tools miss
        warnings.warn(f"{err}. {out / LORA_FILE} is saved in dopsd's own layout instead: it loads in "
                      "`dopsd sample`/`dopsd eval`, not in diffusers or ComfyUI.")
        layout = LAYOUT_PEFT
        written = write_network(out / LORA_FILE, network, facts, dtype or "fp32", layout=layout)
    atomic_write_json(out / LORA_CONFIG, {
        "format": "dopsd-lora", **lora, **meta, "family": family,
        "layout": layout, "alpha_folded": layout == LAYOUT_INTERCHANGE,
    })
    return written


def trained_meta(weights: Path, family: str | None = None, field: str = "weights") -> dict[str, Any]:
    """Check a weights file before any model loads: a readable safetensors file, its lora_config.json (required
    for dopsd's own peft layout: rank/alpha/targets; the interchange layout carries its shapes and scale itself) and,
    given `family`, trained for that model family. `field` names where the path came from in messages (e.g. --lora).
    Returns lora_config.json's content (empty when there is none)."""
    from dopsd.errors import WeightsFileError
    from dopsd.models.local import check_safetensors

    weights = Path(weights)
    if weights.is_dir():
        raise WeightsFileError(f"{field} {weights} is a folder; give its {LORA_FILE} (or {FULL_FILE}), or the run "
                               "folder as the source")
    check_safetensors(weights, field, "use the file a dopsd run wrote")
    cfg_path = weights.parent / LORA_CONFIG
    try:
        meta = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except (ValueError, OSError) as err:
        raise WeightsFileError(f"{cfg_path} is not readable JSON ({err}); it describes {weights.name}") from None
    full = meta.get("format") == "dopsd-full" or weights.name == FULL_FILE
    if not full and not {"rank", "alpha", "targets"} <= set(meta):
        from dopsd.lora_files import read_lora

        if read_lora(weights).modules is None:  # peft keys: the shapes and scale live in lora_config.json
            raise WeightsFileError(f"{weights}: no {LORA_CONFIG} with rank/alpha/targets beside it; pass the LoRA of "
                                   "a dopsd run (for other LoRA files use the tool they were made for)")
    trained_for = meta.get("family")
    if family is not None and trained_for is not None and trained_for != family:
        raise WeightsFileError(f"{weights} was trained for model family {trained_for!r}, but this config's "
                               f"model.family is {family!r}; use the run's own config or a matching LoRA")
    return meta


def apply_trained(network: torch.nn.Module, weights: Path, scale: float = 1.0) -> dict[str, Any]:
    """Load trained weights into `network`: a LoRA file dopsd wrote (either layout), a Z-Image / FLUX.2 LoRA in
    the interchange layout from another tool, or a full fine-tune's model.safetensors. Weights that do not fit the
    network (another model, size or rank) raise WeightsFileError naming the file. Returns lora_config.json's
    content (empty when there is none)."""
    from dopsd.config import ConfigError
    from dopsd.errors import WeightsFileError
    from dopsd.lora import add_lora, exact_targets, load_lora_state_dict
    from dopsd.lora_files import network_family, read_lora
    from dopsd.models.local import read_safetensors

    weights = Path(weights)
    meta = trained_meta(weights)
    if meta.get("format") == "dopsd-full" or weights.name == FULL_FILE:
        state = read_safetensors(weights, "weights", "use the file a dopsd run wrote")
        try:
            missing, unexpected = network.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise WeightsFileError(f"{weights} does not fit this model: {str(err).splitlines()[-1].strip()}") from None
        if unexpected or missing:
            raise WeightsFileError(f"{weights} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return meta
    src = read_lora(weights)
    model_family = network_family(network) or "mini"
    if src.family != model_family:
        raise WeightsFileError(f"{weights} is a {src.family} LoRA; the model is {model_family}")
    if src.modules is None:  # dopsd-peft layout: peft keys, rank/alpha/targets from lora_config.json
        state = read_safetensors(weights, "weights", "use the file a dopsd run wrote")
        state = {k.removeprefix("base_model.model.").removeprefix("transformer."): v for k, v in state.items()}
        if scale != 1.0:
            state = {k: v * scale if "lora_B" in k else v for k, v in state.items()}
        try:
            add_lora(network, meta["targets"], meta["rank"], meta["alpha"])
        except ConfigError:
            raise WeightsFileError(f"{weights} does not fit this model: its LoRA targets {meta['targets']!r} match no "
                                   f"layer of {type(network).__name__}") from None
        try:
            load_lora_state_dict(network, state)
        except WeightsFileError as err:
            raise WeightsFileError(f"{weights}: {err}") from None
        return meta
    # interchange layout: the scale is folded into lora_B, so every module runs at alpha = its rank
    ranks = {m: a.shape[0] for m, (a, _) in src.modules.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    odd = {m: r for m, r in ranks.items() if r != rank}
    try:
        add_lora(network, exact_targets(list(src.modules)), rank, float(rank), rank_pattern=odd,
                 alpha_pattern={m: float(r) for m, r in odd.items()})
    except (ValueError, ConfigError) as err:
        raise WeightsFileError(f"{weights} does not fit this model: {err}") from None
    state = {}
    for m, (a, b) in src.modules.items():
        state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"] = a.float(), b.float() * scale
    try:
        load_lora_state_dict(network, state)
    except (ValueError, RuntimeError) as err:  # shapes or names of another model
        raise WeightsFileError(f"{weights} does not fit this model: {err}") from None
    return meta


# --- the command ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dopsd.cli_args import count, finite, seed

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
    from dopsd import cli_args
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
