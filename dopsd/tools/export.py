"""`dopsd export`: a trained LoRA as a file that diffusers and ComfyUI load with the same result.

Both formats hold the same keys (the interchange layout, dopsd.lora.layout: `diffusion_model.*`, alpha/rank folded
into lora_B, FLUX.2 in the original BFL module names), so either file loads in either tool at strength 1:
  * comfyui: one `.safetensors` file to put in ComfyUI's `models/loras`;
  * diffusers: a folder with `pytorch_lora_weights.safetensors`, for `pipe.load_lora_weights(folder)`.
Tensors are bf16 by default (`--dtype fp16|fp32` otherwise); the metadata names the base model, its variant, the
method, steps, rank, alpha and trigger word (dopsd.lora.meta). A run's own file is bf16: `--dtype fp32` exports the
float32 weights of the run's last checkpoint (with the run file's metadata), never the bf16 values re-encoded.
`model_card=True` writes a Hugging Face model card (README.md, dopsd.lora.card) and the run's sample grids beside
the file. Families without an interchange layout (the miniature, which no other tool has) are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from dopsd.files import atomic_write_bytes, atomic_write_text
from dopsd.lora.card import card_text, run_samples
from dopsd.lora.files import (
    CHECKPOINT_LORA,
    DEFAULT_DTYPE,
    DIFFUSERS_NAME,
    DTYPES,
    RUN_CONFIG,
    RUN_LORA,
    LoraSource,
    checkpoint_of,
    final_checkpoint_lora,
    read_lora,
    write_interchange,
)
from dopsd.lora.inject import ADAPTER, lora_modules
from dopsd.lora.layout import LoraFileError, has_interchange
from dopsd.lora.meta import LoraFacts, run_facts
from dopsd.models import registry

WEIGHTS_NAME = DIFFUSERS_NAME
FAMILIES = registry.interchange_families()  # the families other tools have a model for
FORMATS = ("comfyui", "diffusers")
CARD_NAME = "README.md"


class ExportError(LoraFileError):
    """`dopsd export` refused: the LoRA has no format other tools load, or the options do not fit it."""


def save_diffusers(
    network: nn.Module,
    out_dir: str | Path,
    adapter: str = "default",
    *,
    facts: LoraFacts | None = None,
    dtype: str = DEFAULT_DTYPE,
) -> Path:
    """The network's trained LoRA as `out_dir/pytorch_lora_weights.safetensors` (interchange layout, which
    `pipe.load_lora_weights(out_dir)` and ComfyUI both load); returns the file. `facts` default to what the
    network itself tells (family, size, rank, alpha)."""
    if adapter != ADAPTER:
        raise ExportError(f"dopsd trains one LoRA adapter named {ADAPTER!r}, not {adapter!r}")
    family = registry.family_of_network(network)
    if family is None or not has_interchange(family):
        raise ExportError(
            f"{type(network).__name__} is not the denoiser of a model other tools load "
            f"({', '.join(FAMILIES)}): no diffusers format"
        )
    config = getattr(network, "peft_config", {}).get(adapter)
    if config is None:
        raise ExportError("the network has no LoRA adapter to export (was it trained with LoRA?)")
    facts = facts or run_facts(family, network, {"rank": config.r, "alpha": config.lora_alpha}, {"family": family})
    return write_interchange(Path(out_dir) / WEIGHTS_NAME, lora_modules(network), facts, dtype)


def target_path(out: str | Path, fmt: str, source: Path) -> Path:
    """The file `export` writes: `out` itself if it names a .safetensors file, else a file inside the folder
    `out` (diffusers: pytorch_lora_weights.safetensors; comfyui: named after the run)."""
    out = Path(out)
    if out.suffix == ".safetensors":
        return out
    if fmt == "diffusers":
        return out / WEIGHTS_NAME
    ckpt = checkpoint_of(source)
    if ckpt is not None:  # RUN/checkpoints/step-N/trainable.safetensors → RUN-step-N
        stem = f"{ckpt[0].resolve().name}-{source.parent.name}"
    else:
        stem = source.parent.name if source.name in (RUN_LORA, WEIGHTS_NAME) else source.stem
    return out / f"{stem or 'lora'}.safetensors"


def float32_source(src: LoraSource) -> LoraSource:
    """The float32 weights of `src`: itself if stored in float32, else the run's last checkpoint (the weights as
    trained, before the bf16 rounding of the run file), with `src`'s facts (title, trigger word, steps)."""
    if src.dtype == "fp32":
        return src
    run = src.path.parent if src.path.name == RUN_LORA else None
    state = final_checkpoint_lora(run, src.facts.steps) if run is not None else None
    if state is None:
        where = (
            f"its run {run} keeps no checkpoint of step {src.facts.steps}"
            if run is not None
            else "it is not a run's own file"
        )
        raise ExportError(
            f"{src.path} holds {src.dtype} weights and {where}, so there are no float32 weights to export "
            f"(--dtype fp32 would only re-encode {src.dtype} values at twice the size); export it as {src.dtype}, "
            f"or pass a checkpoint's {CHECKPOINT_LORA}"
        )
    full = read_lora(state)
    if set(full.modules or {}) != set(src.modules or {}):
        raise ExportError(f"{state} holds other LoRA modules than {src.path}; export the checkpoint file itself")
    return LoraSource(src.path, src.family, src.facts, src.layout, full.modules, "fp32")


def write_card(target: Path, facts: LoraFacts, run: Path | None, base_model: str | None) -> Path:
    """README.md beside `target` (and up to 4 of the run's sample grids in images/)."""
    try:  # the grids' rows are the run's sample prompts
        prompts = json.loads((run / RUN_CONFIG).read_text()).get("prompts") if run is not None else None
    except (OSError, ValueError):
        prompts = None
    caption = " | ".join(prompts) if isinstance(prompts, list) and prompts else (facts.title or target.stem)
    samples = []
    for i, grid in enumerate(run_samples(run)):
        name = f"images/{target.stem}-{i}.png"
        atomic_write_bytes(target.parent / name, grid.read_bytes())
        samples.append((name, caption))
    return atomic_write_text(
        target.parent / CARD_NAME, card_text(facts, target.name, base_model=base_model, samples=samples)
    )


def export(
    path: str | Path,
    out: str | Path,
    fmt: str = "comfyui",
    family: str | None = None,
    alpha: float | None = None,
    dtype: str = DEFAULT_DTYPE,
    *,
    title: str | None = None,
    trigger_word: str | None = None,
    overwrite: bool = False,
    model_card: bool = False,
    base_model: str | None = None,
) -> Path:
    """Convert a LoRA dopsd trained (any layout it wrote) into a file other tools load; returns the file."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    src = read_lora(path, alpha=alpha)
    if not has_interchange(src.family):
        base = src.facts.variant or src.family
        raise ExportError(
            f"{src.path} is a {base} LoRA: it loads only in dopsd (`dopsd sample`, `dopsd eval`); "
            f"diffusers and ComfyUI have no such model, so there is nothing to export. Export runs of "
            f"{' or '.join(FAMILIES)} models."
        )
    if family is not None and family != src.family:
        raise ExportError(
            f"{src.path} is a {src.family} LoRA (its module names say so); --model {family} does not "
            f"fit it. Leave out --model or pass --model {src.family}."
        )
    target = target_path(out, fmt, src.path)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; choose another --out or pass --overwrite")
    if target.resolve() == src.path.resolve():
        raise ExportError(f"{target} is the file being exported; choose another --out")
    card = target.parent / CARD_NAME
    if model_card and card.exists() and not overwrite:
        raise ExportError(f"{card} already exists; choose another --out or pass --overwrite")
    if dtype == "fp32":
        src = float32_source(src)
    facts = src.facts.replace(title=title, trigger_word=trigger_word)
    written = write_interchange(target, src.modules or {}, facts, dtype)
    if model_card:
        ckpt = checkpoint_of(src.path)
        run = ckpt[0] if ckpt else (src.path.parent if src.path.name == RUN_LORA else None)
        write_card(written, facts, run, base_model)
    return written
