"""A run's trained weights: written at the end of training, read back by `dopsd sample`, `dopsd eval` and the
demo (LoRA in either layout, or a full fine-tune's state dict), with lora_config.json beside them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from dopsd.config import ConfigError
from dopsd.errors import WeightsFileError
from dopsd.files import atomic_save_safetensors, atomic_write_json
from dopsd.lora.files import CHECKPOINT_LORA, DEFAULT_DTYPE, DIFFUSERS_NAME, read_lora, run_config_of, write_network
from dopsd.lora.inject import add_lora, exact_targets, load_lora_state_dict
from dopsd.lora.layout import LoraFileError, has_interchange
from dopsd.lora.meta import LAYOUT_INTERCHANGE, LAYOUT_PEFT, run_facts, warn_if_unsuccessful
from dopsd.models import registry
from dopsd.models.local import check_safetensors, read_safetensors

LORA_FILE, LORA_CONFIG, FULL_FILE = "lora.safetensors", "lora_config.json", "model.safetensors"


def save_trained(
    out: Path,
    network: torch.nn.Module,
    lora: dict[str, Any] | None,
    meta: dict[str, Any],
    *,
    dtype: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """The trained weights of a run (atomically) + lora_config.json; returns the weights file.

    LoRA: `lora.safetensors`. Families with an interchange layout (Z-Image, FLUX.2): that layout
    (dopsd.lora.layout), which diffusers and ComfyUI load as trained, bf16 unless `dtype` ("bf16" | "fp16" | "fp32")
    says otherwise; the others (the miniature): bare peft keys, float32, labelled dopsd-only. `lora` = {rank, alpha, targets}; `meta` = run facts (family, model config
    dict, method, steps, prompts, and optionally trigger_word and title) kept in lora_config.json and in the file's
    metadata (dopsd.lora.meta). Full fine-tune (`lora` None): `model.safetensors`, `state` or else the network's
    state dict.
    """
    out = Path(out)
    if lora is None:
        state = {
            k: v.detach().cpu().contiguous() for k, v in (network.state_dict() if state is None else state).items()
        }
        atomic_save_safetensors(out / FULL_FILE, state, {"format": "pt", "dopsd": json.dumps({"layout": "dopsd-full"})})
        atomic_write_json(out / LORA_CONFIG, {"format": "dopsd-full", **meta})
        return out / FULL_FILE
    family = meta.get("family") or registry.family_of_network(network) or registry.DEFAULT_FAMILY
    facts = run_facts(family, network, lora, meta, title=out.resolve().name)
    layout = LAYOUT_INTERCHANGE if has_interchange(family) else LAYOUT_PEFT
    try:
        written = write_network(
            out / LORA_FILE,
            network,
            facts,
            dtype or (DEFAULT_DTYPE if layout == LAYOUT_INTERCHANGE else "fp32"),
            layout=layout,
        )
    except LoraFileError as err:
        if layout == LAYOUT_PEFT:
            raise
        # never lose a finished run's weights: keep them in dopsd's own layout and say what other tools miss
        warnings.warn(
            f"{err}. {out / LORA_FILE} is saved in dopsd's own layout instead: it loads in "
            "`dopsd sample`/`dopsd eval`, not in diffusers or ComfyUI."
        )
        layout = LAYOUT_PEFT
        written = write_network(out / LORA_FILE, network, facts, dtype or "fp32", layout=layout)
    atomic_write_json(
        out / LORA_CONFIG,
        {
            "format": "dopsd-lora",
            **lora,
            **meta,
            "family": family,
            "layout": layout,
            "alpha_folded": layout == LAYOUT_INTERCHANGE,
        },
    )
    return written


def weights_file(path: Path, field: str = "weights") -> Path:
    """The weights file of a folder dopsd wrote (a run folder: lora.safetensors or model.safetensors; a
    `dopsd export --format diffusers` folder: pytorch_lora_weights.safetensors; a checkpoint folder:
    trainable.safetensors); a file as it is."""
    path = Path(path)
    if not path.is_dir():
        return path
    names = (LORA_FILE, FULL_FILE, DIFFUSERS_NAME, CHECKPOINT_LORA)
    found = next((path / n for n in names if (path / n).is_file()), None)
    if found is None:
        raise WeightsFileError(
            f"{field} {path} is a folder without weights dopsd reads ({', '.join(names)}); give a LoRA "
            ".safetensors file, a run folder, a `dopsd export` folder or a checkpoint folder"
        )
    return found


def trained_meta(weights: Path, family: str | None = None, field: str = "weights") -> dict[str, Any]:
    """Check a weights file before any model loads: a readable safetensors file, its lora_config.json (required
    for dopsd's own peft layout: rank/alpha/targets; the interchange layout carries its shapes and scale itself) and,
    given `family`, trained for that model family. `field` names where the path came from in messages (e.g. --lora).
    Returns lora_config.json's content (empty when there is none)."""
    weights = weights_file(weights, field)
    check_safetensors(weights, field, "use the file a dopsd run wrote")
    warn_if_unsuccessful(weights)
    cfg_path = run_config_of(weights) or weights.parent / LORA_CONFIG
    try:
        meta = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except (ValueError, OSError) as err:
        raise WeightsFileError(f"{cfg_path} is not readable JSON ({err}); it describes {weights.name}") from None
    full = meta.get("format") == "dopsd-full" or weights.name == FULL_FILE
    if not full and not {"rank", "alpha", "targets"} <= set(meta):
        if read_lora(weights).modules is None:  # peft keys: the shapes and scale live in lora_config.json
            raise WeightsFileError(
                f"{weights}: no {LORA_CONFIG} with rank/alpha/targets beside it; pass the LoRA of "
                "a dopsd run (for other LoRA files use the tool they were made for)"
            )
    trained_for = meta.get("family")
    if family is not None and trained_for is not None and trained_for != family:
        raise WeightsFileError(
            f"{weights} was trained for model family {trained_for!r}, but this config's "
            f"model.family is {family!r}; use the run's own config or a matching LoRA"
        )
    return meta


def apply_trained(network: torch.nn.Module, weights: Path, scale: float = 1.0) -> dict[str, Any]:
    """Load trained weights into `network`: a LoRA file dopsd wrote (either layout), a Z-Image / FLUX.2 LoRA in
    the interchange layout from another tool, or a full fine-tune's model.safetensors. Weights that do not fit the
    network (another model, size or rank) raise WeightsFileError naming the file. Returns lora_config.json's
    content (empty when there is none)."""
    weights = weights_file(weights)
    meta = trained_meta(weights)
    if meta.get("format") == "dopsd-full" or weights.name == FULL_FILE:
        state = read_safetensors(weights, "weights", "use the file a dopsd run wrote")
        try:
            missing, unexpected = network.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise WeightsFileError(f"{weights} does not fit this model: {str(err).splitlines()[-1].strip()}") from None
        if unexpected or missing:
            raise WeightsFileError(
                f"{weights} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return meta
    src = read_lora(weights)
    model_family = registry.family_of_network(network) or registry.DEFAULT_FAMILY
    if src.family != model_family:
        raise WeightsFileError(f"{weights} is a {src.family} LoRA; the model is {model_family}")
    if src.modules is None:  # dopsd-peft layout: peft keys, rank/alpha/targets from lora_config.json
        state = read_safetensors(weights, "weights", "use the file a dopsd run wrote")
        # a checkpoint's keys keep peft's adapter name (`.lora_A.default.weight`); peft adds it back itself
        state = {
            k.removeprefix("base_model.model.").removeprefix("transformer.").replace(".default.weight", ".weight"): v
            for k, v in state.items()
        }
        if scale != 1.0:
            state = {k: v * scale if "lora_B" in k else v for k, v in state.items()}
        try:
            add_lora(network, meta["targets"], meta["rank"], meta["alpha"])
        except ConfigError:
            raise WeightsFileError(
                f"{weights} does not fit this model: its LoRA targets {meta['targets']!r} match no "
                f"layer of {type(network).__name__}"
            ) from None
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
        add_lora(
            network,
            exact_targets(list(src.modules)),
            rank,
            float(rank),
            rank_pattern=odd,
            alpha_pattern={m: float(r) for m, r in odd.items()},
        )
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
