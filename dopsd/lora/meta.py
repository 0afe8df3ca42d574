"""What a LoRA file says about itself: `LoraFacts` → the safetensors metadata keys UIs read.

Written keys (all strings, in the safetensors `__metadata__` header):
  * Stability AI model spec 1.0.0: `modelspec.sai_model_spec`, `.architecture` (`<base>/lora`, the ids kohya's
    trainers use: `Z-Image`, `Flux.2-klein-4b`, `Flux.2-klein-9b`), `.implementation` (whose module names the keys
    follow), `.title`, `.description`, `.date`, `.resolution`, `.trigger_phrase` / `.usage_hint`;
  * kohya-style `ss_network_dim`, `ss_network_alpha` (the alpha that applies to the tensors as stored),
    `ss_base_model_version`, `ss_sd_model_name`, `ss_steps`, `ss_output_name`;
  * `dopsd`: the facts as JSON (read back by dopsd), `editing` among them (an editing LoRA also says so in
    `.description` and `.usage_hint`).
A checkpoint's LoRA-keyed files carry diffusers' `lora_adapter_metadata` instead (`checkpoint_metadata`).
The base model is recorded by folder name, never by its full local path.
"""

from __future__ import annotations

import datetime
import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePath
from typing import Any, Mapping

from torch import nn

from dopsd.models import registry

LAYOUT_INTERCHANGE, LAYOUT_PEFT = "interchange", "dopsd-peft"
EDITING_HINT = "Editing LoRA: give the source image(s) and an edit instruction as the prompt"
# The run folder's summary.json (dopsd.runs.folder) and the statuses of a run that did not succeed: the weights a
# run folder holds are read here, so the names its outcome is told by live here too.
RUN_SUMMARY = "summary.json"
STATUS_UNHEALTHY, STATUS_ABORTED = "unhealthy", "aborted"


def warn_if_unsuccessful(weights: Path) -> None:
    """Say so when a weights file sits in a run folder whose summary.json records a run that did not succeed
    (the weights are still used: the user may want to look at a broken run)."""
    try:
        summary = json.loads((Path(weights).parent / RUN_SUMMARY).read_text())
    except (OSError, ValueError):
        return
    status = summary.get("status") if isinstance(summary, dict) else None
    if status in (STATUS_UNHEALTHY, STATUS_ABORTED):
        problem = summary.get("problem") or "see its summary.json"
        warnings.warn(f"{weights} comes from a run that ended {status}: {problem}", stacklevel=2)


@dataclass
class LoraFacts:
    family: str  # a key of dopsd.models.registry.FAMILIES
    rank: int
    alpha: float  # as trained (scale alpha / rank); interchange files carry it folded into lora_B
    variant: str | None = None  # e.g. "FLUX.2-klein 4B" (from the transformer's size)
    architecture: str | None = None  # modelspec id of the base, e.g. "Flux.2-klein-4b"
    base_version: str | None = None  # ss_base_model_version, e.g. "flux2_klein_4b"
    base_model: str | None = None  # the base model's folder name (or hub id)
    method: str | None = None  # "dopsd" | "sft" | "hybrid"
    steps: int | None = None
    trigger_word: str | None = None
    title: str | None = None
    resolution: tuple[int, int] | None = None  # (width, height) trained at
    editing: bool = False  # an editing LoRA: applied to source image(s) + an instruction (model.editing)

    def replace(self, **changes: Any) -> "LoraFacts":
        known = {f.name for f in fields(self)}
        return LoraFacts(**{**asdict(self), **{k: v for k, v in changes.items() if k in known and v is not None}})


def run_facts(
    family: str, network: nn.Module | None, lora: Mapping[str, Any], meta: Mapping[str, Any], title: str | None = None
) -> LoraFacts:
    """Facts of a training run: `lora` = {rank, alpha, ...}, `meta` = what dopsd.training.api records (family, model
    config dict with pretrained/height/width, method, steps, and optionally trigger_word and title)."""
    try:
        base = registry.base_facts(family, network)
    except ValueError:  # a family this dopsd does not have
        base = None
    variant, arch, version = (base.variant, base.architecture, base.base_version) if base else (None, None, None)
    model = meta.get("model") or {}
    pretrained = model.get("pretrained")
    resolution = (int(model["width"]), int(model["height"])) if model.get("width") and model.get("height") else None
    return LoraFacts(
        family=family,
        rank=int(lora["rank"]),
        alpha=float(lora["alpha"]),
        variant=variant,
        architecture=arch,
        base_version=version,
        base_model=PurePath(str(pretrained)).name if pretrained else None,
        method=meta.get("method"),
        steps=meta.get("steps"),
        trigger_word=meta.get("trigger_word"),
        title=meta.get("title") or title,
        resolution=resolution,
        editing=bool(model.get("editing")),
    )


def _interchange(family: str) -> Any:
    """The family's interchange layout (dopsd.models.base.LoraLayout), None without one or for unknown families."""
    try:
        return registry.lora_layout(family)
    except ValueError:
        return None


def file_metadata(facts: LoraFacts, layout: str, dtype: str) -> dict[str, str]:
    """The safetensors metadata of a LoRA file with these facts, in `layout` (interchange or dopsd-peft)."""
    folded = layout == LAYOUT_INTERCHANGE
    base = facts.variant or facts.family
    what = f"{facts.method or 'dopsd'} {'editing ' if facts.editing else ''}LoRA for {base}"
    interchange = _interchange(facts.family)
    if interchange is None:
        how = (
            f"{base} LoRA (peft keys): loads only in dopsd (`dopsd sample`, `dopsd eval`); "
            "no other tool has this model."
        )
    elif not folded:
        how = "dopsd's own layout (peft keys): loads only in dopsd (`dopsd sample`, `dopsd eval`)."
    else:
        how = (
            f"Loads in diffusers (`pipe.load_lora_weights`) and ComfyUI at strength 1.0: alpha {facts.alpha:g} / "
            f"rank {facts.rank} is folded into the weights."
        )
    description = " ".join(
        filter(
            None,
            [
                f"{what}, rank {facts.rank}"
                + (f", {facts.steps} steps" if facts.steps is not None else "")
                + (f", base model {facts.base_model}" if facts.base_model else "")
                + ".",
                f"Trigger word: {facts.trigger_word}." if facts.trigger_word else None,
                EDITING_HINT if facts.editing else None,
                how,
                "Trained with dopsd.",
            ],
        )
    )
    md = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{facts.architecture or facts.family}/lora",
        "modelspec.implementation": interchange.implementation if folded and interchange else "dopsd",
        "modelspec.title": facts.title or what,
        "modelspec.description": description,
        "modelspec.date": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
        "ss_network_dim": str(facts.rank),
        # the alpha that applies to the stored tensors: folded files are at scale 1 (alpha = rank)
        "ss_network_alpha": str(facts.rank if folded else facts.alpha),
        "ss_output_name": facts.title or what,
        "dopsd": json.dumps({**asdict(facts), "layout": layout, "alpha_folded": folded, "dtype": dtype}),
    }
    optional = {
        "modelspec.resolution": f"{facts.resolution[0]}x{facts.resolution[1]}" if facts.resolution else None,
        "modelspec.trigger_phrase": facts.trigger_word,
        "modelspec.usage_hint": "; ".join(
            filter(
                None,
                [f"Trigger word: {facts.trigger_word}" if facts.trigger_word else None, EDITING_HINT * facts.editing],
            )
        )
        or None,
        "ss_base_model_version": facts.base_version,
        "ss_sd_model_name": facts.base_model,
        "ss_steps": str(facts.steps) if facts.steps is not None else None,
    }
    md.update({k: v for k, v in optional.items() if v is not None})
    return md


def facts_from_metadata(md: Mapping[str, str] | None) -> tuple[LoraFacts, str, bool] | None:
    """(facts, layout, alpha_folded) from a file dopsd wrote, or None for other files."""
    raw = (md or {}).get("dopsd")
    if not raw:
        return None
    try:
        data = json.loads(raw)
        layout, folded = data.pop("layout"), bool(data.pop("alpha_folded"))
        data.pop("dtype", None)
        known = {f.name for f in fields(LoraFacts)}
        facts = LoraFacts(**{k: v for k, v in data.items() if k in known})
    except (ValueError, KeyError, TypeError):
        return None
    if facts.resolution is not None:
        facts.resolution = tuple(facts.resolution)  # type: ignore[assignment]
    return facts, layout, folded


LAYOUT_CHECKPOINT = "dopsd-checkpoint"


def checkpoint_metadata(network: nn.Module) -> dict[str, str] | None:
    """The metadata of a checkpoint's LoRA-keyed files (trainable / teacher / prior .safetensors): the adapter's
    peft config in diffusers' own `lora_adapter_metadata` entry, so `pipe.load_lora_weights` applies the file at
    alpha / rank as trained instead of at scale 1 (half strength at alpha = 2 × rank). Their keys keep peft's
    `.default.` adapter part, which ComfyUI's loader maps to no weight: it leaves such a file unloaded rather than
    applying it wrongly. None for a network without a LoRA (full fine-tuning)."""
    config = (getattr(network, "peft_config", None) or {}).get("default")
    if config is None:
        return None
    peft = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()}
    return {
        "format": "pt",
        # diffusers' pipelines read the keys of their `transformer` component with this prefix
        "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in peft.items()}, sort_keys=True),
        "dopsd": json.dumps({"layout": LAYOUT_CHECKPOINT, "rank": config.r, "alpha": config.lora_alpha}),
    }
