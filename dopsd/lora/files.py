"""Reading and writing LoRA files: a trained network or a LoRA file → `LoraSource` → a file other tools load.

Layouts dopsd writes:
  * interchange (the families with a LoRA layout, Z-Image and FLUX.2; see dopsd.lora.layout): loads in diffusers
    and ComfyUI with the same result; bf16 by default (`DTYPES`), metadata per dopsd.lora.meta;
  * dopsd-peft (families no other tool has, i.e. the miniature): bare peft keys `<module>.lora_A.weight`, float32,
    labelled as such in the metadata, with `lora_config.json` (rank, alpha, targets) beside it.
Layouts dopsd reads: both of those, diffusers' `transformer.*` files with peft metadata (older dopsd runs), bare
peft keys with a `lora_config.json` (older dopsd runs), and `.alpha` keys anywhere.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dopsd.files import atomic_save_safetensors
from dopsd.lora.inject import lora_modules, lora_state_dict
from dopsd.lora.layout import (
    PREFIX,
    LoraFileError,
    Pair,
    family_of_names,
    from_interchange,
    has_interchange,
    split_keys,
    to_interchange,
)
from dopsd.lora.meta import (
    LAYOUT_INTERCHANGE,
    LAYOUT_PEFT,
    LoraFacts,
    facts_from_metadata,
    file_metadata,
    run_facts,
    warn_if_unsuccessful,
)
from dopsd.models import registry

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_DTYPE = "bf16"  # for files other tools load; the miniature's own file stays float32
RUN_LORA, RUN_CONFIG, DIFFUSERS_NAME = "lora.safetensors", "lora_config.json", "pytorch_lora_weights.safetensors"
# A run's checkpoints (dopsd.runs.checkpoint, named here to keep the layers pointing down): RUN/checkpoints/step-N/
# holds the float32 LoRA as trained (peft keys, unfolded) in trainable.safetensors, the EMA teacher's and the
# prior's in teacher / prior .safetensors.
CHECKPOINTS, STEP_PREFIX, CHECKPOINT_LORA = "checkpoints", "step-", "trainable.safetensors"
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class LoraSource:
    """A LoRA read from a file: `modules` are diffusers-named (A, B) with the LoRA scale folded into B (None for
    the miniature's peft layout, which only dopsd loads)."""

    path: Path
    family: str
    facts: LoraFacts
    layout: str
    modules: dict[str, Pair] | None
    dtype: str = "fp32"  # of the tensors as stored ("bf16" | "fp16" | "fp32")


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise LoraFileError(f"unknown LoRA dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def write_interchange(path: str | Path, modules: dict[str, Pair], facts: LoraFacts, dtype: str = DEFAULT_DTYPE) -> Path:
    """Write folded diffusers-named modules in the interchange layout (atomically); returns the path."""
    torch_dtype = check_dtype(dtype)
    tensors = {
        k: v.detach().to("cpu", torch.float32).to(torch_dtype).contiguous()
        for k, v in to_interchange(modules, facts.family).items()
    }
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise LoraFileError(
            f"{path}: LoRA weights are not finite in {dtype} (e.g. {bad[0]}); "
            + ("use --dtype bf16 or fp32" if dtype == "fp16" else "the trained weights are broken")
        )
    return atomic_save_safetensors(path, tensors, file_metadata(facts, LAYOUT_INTERCHANGE, dtype))


def write_network(
    path: str | Path, network: nn.Module, facts: LoraFacts, dtype: str | None = None, *, layout: str | None = None
) -> Path:
    """The trained LoRA of `network` to `path`: interchange layout for families that have one, dopsd-peft
    otherwise (or when `layout` says so)."""
    layout = layout or (LAYOUT_INTERCHANGE if has_interchange(facts.family) else LAYOUT_PEFT)
    if layout == LAYOUT_INTERCHANGE:
        return write_interchange(path, lora_modules(network), facts, dtype or DEFAULT_DTYPE)
    torch_dtype = check_dtype(dtype or "fp32")
    state = {k: v.detach().to("cpu").to(torch_dtype).contiguous() for k, v in lora_state_dict(network).items()}
    return atomic_save_safetensors(path, state, file_metadata(facts, LAYOUT_PEFT, dtype or "fp32"))


def checkpoint_of(file: Path) -> tuple[Path, int] | None:
    """(run folder, step) of a file inside a run's checkpoint (RUN/checkpoints/step-N/FILE), else None."""
    step = file.parent
    digits = step.name.removeprefix(STEP_PREFIX)
    if step.name.startswith(STEP_PREFIX) and digits.isdigit() and step.parent.name == CHECKPOINTS:
        return step.parent.parent, int(digits)
    return None


def run_config_of(file: Path) -> Path | None:
    """The lora_config.json that describes `file`: beside a run's lora.safetensors, or the run's own for a file in
    one of its checkpoints."""
    ckpt = checkpoint_of(file)
    if ckpt is not None:
        return ckpt[0] / RUN_CONFIG
    return file.parent / RUN_CONFIG if file.name == RUN_LORA else None


def final_checkpoint_lora(run: Path, steps: int | None) -> Path | None:
    """The float32 LoRA of a run's last step (its final checkpoint's trainable.safetensors), if it is kept."""
    if steps is None:
        return None
    path = run / CHECKPOINTS / f"{STEP_PREFIX}{int(steps):07d}" / CHECKPOINT_LORA
    return path if path.is_file() else None


def resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        names = (RUN_LORA, DIFFUSERS_NAME, CHECKPOINT_LORA)
        p = next((p / n for n in names if (p / n).is_file()), p / RUN_LORA)
    if not p.is_file():
        full = (
            " (its model.safetensors is a full fine-tune, not a LoRA)"
            if (p.parent / "model.safetensors").is_file()
            else ""
        )
        raise LoraFileError(
            f"no LoRA file at {path}{full}: pass a dopsd run folder ({RUN_LORA} + {RUN_CONFIG}), "
            f"a folder with {DIFFUSERS_NAME}, a checkpoint folder ({CHECKPOINT_LORA}), or a LoRA .safetensors file"
        )
    return p


def _peft_scale(pe: dict[str, Any], module: str, rank: int) -> float:
    """alpha / r of one module from diffusers' stored peft config (rank/alpha patterns honoured)."""

    def hit(pattern: str) -> bool:
        pattern = pattern.removeprefix("transformer.")
        return module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module) is not None

    r = next((v for p, v in (pe.get("rank_pattern") or {}).items() if hit(p)), pe.get("r", rank))
    a = next((v for p, v in (pe.get("alpha_pattern") or {}).items() if hit(p)), pe.get("lora_alpha", r))
    return a / (r**0.5 if pe.get("use_rslora") else r)


def read_lora(path: str | Path, alpha: float | None = None) -> LoraSource:
    """Any LoRA file dopsd wrote (or a diffusers / ComfyUI LoRA of Z-Image or FLUX.2) as a `LoraSource`.
    `alpha` is only for bare peft files without a stored alpha."""
    from safetensors import safe_open

    file = resolve(path)
    warn_if_unsuccessful(file)
    try:
        with safe_open(str(file), "pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
            md = fh.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a broken file
        raise LoraFileError(f"{file} is not a readable .safetensors file ({err})") from err
    prefix, parts = split_keys(state, str(file))
    own = facts_from_metadata(md)
    sidecar = run_config_of(file)
    try:
        config = json.loads(sidecar.read_text()) if sidecar is not None and sidecar.is_file() else {}
    except ValueError as err:
        raise LoraFileError(f"{sidecar} is not valid JSON ({err}); restore it from the run or delete it") from err
    ckpt = checkpoint_of(file)
    if ckpt is not None:  # the run's facts, at the checkpoint's step
        config = {**config, "steps": ckpt[1], "title": config.get("title") or ckpt[0].resolve().name}
    family = (
        family_of_names(list(parts))
        or (own[0].family if own else None)
        or config.get("family")
        or registry.DEFAULT_FAMILY
    )
    for claimed in ((own[0].family if own else None), config.get("family")):
        if claimed and claimed != family:
            raise LoraFileError(f"{file}: the keys are {family} module names but the file says family {claimed!r}")
    stored_alpha = own[0].alpha if own else (config.get("alpha") if "rank" in config else None)
    if alpha is not None and (
        stored_alpha is not None
        or prefix == PREFIX
        or "lora_adapter_metadata" in md
        or any("alpha" in p for p in parts.values())
    ):
        raise LoraFileError(f"{file} records its own LoRA scale; --alpha is only for bare peft files without one")
    ranks = Counter(p["A"].shape[0] for p in parts.values())
    rank = ranks.most_common(1)[0][0]
    base = (
        own[0]
        if own
        else run_facts(family, None, {"rank": config.get("rank", rank), "alpha": stored_alpha or alpha or rank}, config)
    )
    if base.title is None and file.name in (RUN_LORA, DIFFUSERS_NAME):
        base.title = file.parent.resolve().name
    stored = DTYPE_NAMES.get(next(iter(parts.values()))["A"].dtype, "fp32")
    if not has_interchange(family):
        return LoraSource(file, family, base, LAYOUT_PEFT, None, stored)
    if prefix == PREFIX:
        modules = from_interchange(parts, family)
    else:
        try:
            pe = json.loads(md["lora_adapter_metadata"]) if "lora_adapter_metadata" in md else None
        except ValueError as err:
            raise LoraFileError(f"{file}: its lora_adapter_metadata is not valid JSON ({err})") from err
        if pe is not None:
            pe = {k.removeprefix("transformer."): v for k, v in pe.items()}
        elif stored_alpha is None and alpha is None and not any("alpha" in p for p in parts.values()):
            raise LoraFileError(
                f"{file} carries no LoRA alpha (bare peft keys and no {RUN_CONFIG} beside it); pass --alpha"
            )
        modules = {}
        for name, p in parts.items():
            r = p["A"].shape[0]
            if "alpha" in p:
                scale = float(p["alpha"]) / r
            elif pe is not None:
                scale = _peft_scale(pe, name, r)
            else:
                scale = float(stored_alpha if stored_alpha is not None else alpha) / base.rank
            modules[name] = (p["A"].float(), p["B"].float() * scale)
    if base.variant is None:
        told = registry.base_facts(family, lora=modules)
        if told is not None:
            base.variant, base.architecture, base.base_version = told.variant, told.architecture, told.base_version
    return LoraSource(file, family, base, LAYOUT_INTERCHANGE, modules, stored)
