"""Continual tuning: a run that starts from an earlier run's result (train.init_from, train.init_mode).

  merge     the earlier run's model (its LoRA folded into its base) is the new base; a fresh LoRA trains on it
            (a full fine-tune trains all of its weights);
  continue  the earlier run's LoRA keeps training (same lora.rank / alpha / targets) on the earlier run's base;
            a full fine-tune continues from its weights.
The earlier run may itself have started from another one: its lineage is rebuilt link by link (a merged
ancestor is folded in, a continued one is what the LoRA already holds), so round 3 of a chain of merges starts
from base + ΔW₁ + ΔW₂. A run folder's weights come from its final checkpoint (float32, exactly what it
trained); a bare LoRA file (lora.safetensors / model.safetensors of a dopsd run) is used as written.

`resolve(cfg)` checks everything before any model is loaded (one clear message per problem); `apply` builds the
starting network inside the trainer's setup, before the EMA teacher copies it, so the teacher starts from the
current model; `lineage` is what summary.json and lora_config.json record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dopsd.config import ConfigError, load_config
from dopsd.errors import CheckpointError, RunFolderError
from dopsd.lora.inject import add_lora
from dopsd.lora.trained import FULL_FILE, apply_trained, trained_meta
from dopsd.runs import checkpoint as ckpt
from dopsd.runs import folder as rundir
from dopsd.runs import lock as runlock

MAX_DEPTH = 64  # a lineage longer than this is a loop of runs starting from each other


@dataclass
class Source:
    path: Path  # what train.init_from names (resolved): a run folder or a weights file
    mode: str  # how the run that names it uses it: "merge" | "continue"
    full: bool  # a full fine-tune's weights (no LoRA)
    weights: Path  # lora.safetensors / model.safetensors
    trainable: Path | None  # the final checkpoint's trainable.safetensors (run folders), else None
    lora: dict[str, Any] | None  # {rank, alpha, targets} of its LoRA
    steps: int | None
    method: str | None
    parent: Source | None  # where the source run itself started from


def _pretrained(value: Any, origin: Path | None = None) -> str | None:
    """model.pretrained comparable across configs: a resolved path where it names one, else the keyword."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and origin is not None and (origin / path).exists():
        path = origin / path
    return str(path.resolve()) if path.exists() else str(value)


def _check_model(where: Path, family: Any, pretrained: Any, cfg: Any) -> None:
    if family != cfg.model.family:
        raise RunFolderError(
            f"train.init_from {where} was trained on model.family {family!r}, but this config "
            f"trains {cfg.model.family!r}; start from a run of the same model"
        )
    mine = _pretrained(cfg.model.pretrained)
    theirs = _pretrained(pretrained)
    if theirs != mine and not (theirs in (None, "turbo") and mine in (None, "turbo")):
        raise RunFolderError(
            f"train.init_from {where} was trained on model.pretrained {pretrained!r}, but this "
            f"config trains {cfg.model.pretrained!r}; start from a run of the same model"
        )


def _from_run(folder: Path, cfg: Any, mode: str, depth: int) -> Source:
    if not rundir.is_run_folder(folder):
        raise RunFolderError(
            f"train.init_from {folder} is not a dopsd run folder (no {rundir.MARKER}); point it "
            "at a finished dopsd run folder or its lora.safetensors / model.safetensors"
        )
    if runlock.is_running(folder):
        raise RunFolderError(f"train.init_from {folder} is a run still training; wait until it has finished")
    try:
        summary = json.loads((folder / rundir.SUMMARY).read_text())
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict) or summary.get("status") != rundir.STATUS_OK:
        status = (
            "no summary.json: stopped before the end"
            if not isinstance(summary, dict)
            else f"status {summary.get('status')!r}"
        )
        raise RunFolderError(
            f"train.init_from {folder} is not a finished run ({status}); finish it with "
            "`dopsd train CONFIG --resume`, or start from a run whose summary.json says status 'ok'"
        )
    try:
        src = load_config(folder / rundir.CONFIG)
    except Exception as err:  # noqa: BLE001 - any unreadable config is the same problem for the user
        raise RunFolderError(f"train.init_from {folder}: its {rundir.CONFIG} cannot be read ({err})") from None
    _check_model(folder, src.model.family, src.model.pretrained, cfg)
    full = not src.lora.enabled
    weights = folder / ("model.safetensors" if full else "lora.safetensors")
    if not weights.is_file():
        raise RunFolderError(
            f"train.init_from {folder} has no {weights.name}; start from a run that wrote its final weights"
        )
    final = ckpt.checkpoint_dir(folder / rundir.CHECKPOINTS, int(summary.get("steps") or 0)) / "trainable.safetensors"
    parent = None
    if src.train.init_from:
        if depth >= MAX_DEPTH:
            raise RunFolderError(f"train.init_from {folder}: its lineage is longer than {MAX_DEPTH} runs (a loop?)")
        parent = resolve_path(Path(src.train.init_from), src, src.train.init_mode, depth + 1)
    lora = None if full else {"rank": src.lora.rank, "alpha": src.lora.alpha, "targets": src.lora.targets}
    return Source(
        folder,
        mode,
        full,
        weights,
        final if final.is_file() else None,
        lora,
        summary.get("steps"),
        src.method.name,
        parent,
    )


def _from_file(path: Path, cfg: Any, mode: str) -> Source:
    meta = trained_meta(path, cfg.model.family, field="train.init_from")
    model = meta.get("model") or {}
    if model:
        _check_model(path, meta.get("family", cfg.model.family), model.get("pretrained"), cfg)
    if meta.get("lineage"):
        raise RunFolderError(
            f"train.init_from {path} was trained on top of an earlier run; give its run folder "
            "instead, so that the whole lineage is rebuilt"
        )
    full = meta.get("format") == "dopsd-full" or path.name == FULL_FILE
    lora = None if full else {k: meta.get(k) for k in ("rank", "alpha", "targets")}
    return Source(path, mode, full, path, None, lora, meta.get("steps"), meta.get("method"), None)


def resolve_path(path: Path, cfg: Any, mode: str, depth: int = 0) -> Source:
    path = path.expanduser()
    if not path.exists():
        raise RunFolderError(
            f"train.init_from {path} does not exist; point it at a finished dopsd run folder or "
            "its lora.safetensors / model.safetensors"
        )
    path = path.resolve()
    return _from_run(path, cfg, mode, depth) if path.is_dir() else _from_file(path, cfg, mode)


def resolve(cfg: Any) -> Source | None:
    """The checked source of train.init_from (None without one); raises RunFolderError / WeightsFileError /
    ConfigError with one message per problem, before any model is loaded."""
    if not cfg.train.init_from:
        return None
    out = Path(cfg.train.output_dir).expanduser().resolve()
    where = Path(cfg.train.init_from).expanduser().resolve()
    if where == out or out in where.parents:
        raise RunFolderError(
            f"train.init_from {where} is this run's own folder (train.output_dir); start from an earlier run's folder"
        )
    src = resolve_path(Path(cfg.train.init_from), cfg, cfg.train.init_mode)
    if cfg.train.init_mode == "continue":
        if cfg.lora.enabled and src.full:
            raise ConfigError(
                f"train.init_mode is 'continue' but train.init_from {src.path} is a full fine-tune (no "
                "LoRA to continue); use train.init_mode=merge to train a LoRA on its weights"
            )
        if not cfg.lora.enabled and not src.full:
            raise ConfigError(
                f"train.init_mode is 'continue' but this config is a full fine-tune and train.init_from "
                f"{src.path} is a LoRA; use train.init_mode=merge (its LoRA is folded into the weights)"
            )
        if src.lora is not None:
            mine = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": cfg.lora.targets}
            diff = [k for k in mine if src.lora.get(k) != mine[k] and not (k == "alpha" and src.lora.get(k) is None)]
            if diff:
                given = ", ".join(f"lora.{k}={src.lora.get(k)!r}" for k in diff)
                raise ConfigError(
                    f"train.init_mode is 'continue', which keeps training the LoRA of {src.path}, but "
                    f"its {', '.join('lora.' + k for k in diff)} differ from this config's; set {given}, "
                    "or use train.init_mode=merge to train a fresh LoRA on top of it"
                )
    return src


# --- building the starting network ---------------------------------------------------------------------------
def merge_lora(network: nn.Module) -> None:
    """Fold every LoRA adapter into its base layer and put the base layer back in place (no LoRA left)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(network.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = network.get_submodule(parent_name) if parent_name else network
            setattr(parent, child, module.get_base_layer())
    if hasattr(network, "peft_config"):  # no adapter left: a later LoRA starts a config of its own
        del network.peft_config


def _load_trainable(network: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = dict(network.named_parameters())
    missing = [k for k in saved if k not in params]
    if missing:
        raise CheckpointError(f"{path} does not fit this model (e.g. {missing[:3]}); start from a run of this model")
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v.to(params[k].dtype))


def _add_source_lora(network: nn.Module, src: Source, default_targets: Any) -> None:
    """The source's LoRA with its trained values (on top of whatever the network holds now)."""
    if src.trainable is None:  # a bare LoRA file: read it as `dopsd sample` does
        apply_trained(network, src.weights)
        return
    assert src.lora is not None
    add_lora(network, src.lora["targets"] or default_targets, src.lora["rank"], src.lora["alpha"])
    _load_trainable(network, src.trainable)


def _rebuild_base(network: nn.Module, src: Source, default_targets: Any) -> None:
    """The base the source's own weights were trained on (its lineage up to them)."""
    if src.parent is None or src.full:  # full weights replace every weight anyway
        return
    if src.parent.mode == "continue":
        _rebuild_base(network, src.parent, default_targets)
    else:
        _rebuild_merged(network, src.parent, default_targets)


def _rebuild_merged(network: nn.Module, src: Source, default_targets: Any) -> None:
    """The source's final model with its LoRA folded in."""
    if src.full:
        if src.trainable is not None:
            _load_trainable(network, src.trainable)
        else:
            apply_trained(network, src.weights)
        return
    _rebuild_base(network, src, default_targets)
    _add_source_lora(network, src, default_targets)
    merge_lora(network)


def apply(network: nn.Module, cfg: Any, src: Source, default_targets: Any) -> bool:
    """Make `network` (the pristine base) this run's starting model; True when its LoRA is already in place and
    trainable (continue), False when the trainer adds its fresh LoRA (or trains all weights) as usual."""
    if cfg.lora.enabled and cfg.train.init_mode == "continue":
        _rebuild_base(network, src, default_targets)
        if src.trainable is None:
            _add_source_lora(network, src, default_targets)
        else:
            add_lora(network, cfg.lora.targets or default_targets, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
            _load_trainable(network, src.trainable)
        for name, p in network.named_parameters():
            p.requires_grad_("lora_" in name)
        return True
    _rebuild_merged(network, src, default_targets)
    return False


def lineage(src: Source | None) -> list[dict[str, Any]]:
    """Oldest first: every run this one builds on, and how each used the one before."""
    if src is None:
        return []
    return lineage(src.parent) + [
        {
            "from": str(src.path),
            "mode": src.mode,
            "steps": src.steps,
            "method": src.method,
            "weights": "full" if src.full else "lora",
        }
    ]
