"""The bench's results.json: its schema (the required methods and fields, FIELD_DOCS: each field's meaning and
which direction is better), its validation and writing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch

# The methods every setting must report (the paper's comparison), and the per-method fields results.json must carry.
REQUIRED_METHODS = (
    "base",
    "sft",
    "sft_adapter",
    "dopsd",
    "dopsd_base_teacher",
    "dopsd_live_teacher",
    "pso",
    "dreambooth",
    "offpolicy",
    "sft_teacher",
)
# The continual setting's block: per method and sequence, one row per round (0 = the untouched model) with these.
CONTINUAL_FIELDS = (
    "round",
    "target",
    "new_fidelity",
    "retention",
    "fewstep_quality",
    "preservation",
    "unrelated_accuracy",
    "drift",
    "seeds",
)
REQUIRED_FIELDS = (
    "concept_fidelity",
    "fewstep_quality",
    "manystep_quality",
    "unseen_prompt_fidelity",
    "preservation",
    "sec_per_step",
    "peak_mem_mb",
    "seeds",
)
# Fields that are null for the untrained `base` (nothing was trained, so no step cost).
COST_FIELDS = (
    "sec_per_step",
    "peak_mem_mb",
    "time_ratio_vs_sft",
    "flop_ratio_vs_sft",
    "overhead_vs_flops",
    "mem_ratio_vs_sft",
    "flops_per_step",
    "train_sec_per_step",
)

# field -> (meaning, direction). The direction is what the report's verdicts assume; documented in the report.
FIELD_DOCS: dict[str, tuple[str, str]] = {
    "concept_fidelity": (
        "fraction of 4-step samples on the training prompts whose decoded attribute is the target "
        "concept (concept setting) or the target domain (domain setting)",
        "higher",
    ),
    "unseen_prompt_fidelity": (
        "the same fraction on prompts never seen in training (new shapes, backgrounds, combinations)",
        "higher",
    ),
    "fewstep_quality": (
        "quality of 4-step samples on unrelated prompts: the miniature's quality score (see "
        "Metrics), higher = sharper / closer to the base model's many-step output",
        "higher",
    ),
    "manystep_quality": ("the same quality score for many-step samples of the same network (the control)", "higher"),
    "preservation": (
        "fraction of unrelated-prompt samples whose decoded scene matches the untouched turbo's for the "
        "same noise: same shape, colour and background names, centre within 1.5 px, extent within "
        "1.5 px (see Metrics)",
        "higher",
    ),
    "unrelated_accuracy": (
        "fraction of unrelated-prompt samples whose captioned attributes (shape, colour, background) "
        "are all decoded right: does 'a red square' still come out a red square",
        "higher",
    ),
    "position_shift_px": (
        "mean shift of the shape's centre (px) against the untouched turbo's sample, same shape only",
        "lower",
    ),
    "size_change_px": (
        "mean |change| of the shape's extent (px) against the untouched turbo's sample, same shape only",
        "lower",
    ),
    "drift": (
        "mean squared difference to the untouched turbo's 4-step output for the same noise and prompt, on "
        "unrelated prompts",
        "lower",
    ),
    "sec_per_step": ("median wall seconds of one optimizer step, all methods interleaved in one process", "lower"),
    "time_ratio_vs_sft": ("sec_per_step / SFT's, measured in the same run", "lower"),
    "flop_ratio_vs_sft": (
        "FLOPs the algorithm implies per step / SFT's (counted from the network's actual ops)",
        "lower",
    ),
    "overhead_vs_flops": (
        "time_ratio_vs_sft / flop_ratio_vs_sft; 1 = costs exactly its arithmetic, > 1 = overhead beyond the algorithm",
        "lower",
    ),
    "peak_mem_mb": (
        "peak tensor memory of one optimizer step in MiB (resident weights, gradients, optimizer and "
        "teacher state + transient peak)",
        "lower",
    ),
    "mem_ratio_vs_sft": ("peak_mem_mb / SFT's", "lower"),
    "flops_per_step": ("FLOPs counted over one whole optimizer step", "lower"),
    "train_sec_per_step": (
        "the trainer's own mean seconds per step in the training runs (includes data, logging; "
        "runs were not interleaved)",
        "lower",
    ),
    "seeds": ("number of training seeds (each *_std field is the standard deviation over all runs)", "-"),
    "runs": ("runs averaged: targets × seeds", "-"),
    "steps": ("optimizer steps of each run (0 = not trained)", "-"),
    "sharpness": (
        "mean |Laplacian| of the 4-step samples on unrelated prompts (clean renders set the scale)",
        "higher",
    ),
    "render_psnr": (
        "PSNR (dB) of 4-step unrelated samples to their best-fitting clean render; blur and speckle lower it",
        "higher",
    ),
    "attribute_accuracy": (
        "fraction of captioned attributes (shape, colour, background) decoded right on unrelated "
        "prompts, tint-invariant",
        "higher",
    ),
    "fewstep_quality_concept": ("fewstep_quality on the training prompts' samples", "higher"),
    "concept_leak": ("fraction of unrelated-prompt samples showing the concept colour (concept setting)", "lower"),
    "strict_fidelity": (
        "domain setting: fraction of 4-step samples on the training prompts carrying the tint itself (fitted amount "
        "within ±0.10, hue within 15°, chroma within 50%: over-tinting fails it, unlike concept_fidelity's test)",
        "higher",
    ),
    "unseen_strict_fidelity": ("strict_fidelity on the unseen prompts (domain setting)", "higher"),
    "tinted_strict_fidelity": (
        "`base` only, domain setting: strict_fidelity of the untouched turbo's samples with the tint added in pixel "
        "space (a fine-tune that adds exactly the tint and changes nothing else)",
        "-",
    ),
    "tinted_unseen_strict_fidelity": ("the same on the unseen prompts", "-"),
    "done_distance": (
        "curves only: the done signal `dopsd train` logs, the mean palette distance of the training prompts' "
        "samples to their captions' training images (lowest = done)",
        "lower",
    ),
    "domain_on_unrelated": ("fraction of unrelated-prompt samples in the new domain (domain setting; intended)", "-"),
}


def is_trained(method: str) -> bool:
    """`base` and the `ref_*` reference rows are evaluated without training (no step cost)."""
    return method != "base" and not method.startswith("ref_")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, tensors → lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def validate_results(results: dict[str, Any], required: Iterable[str] = REQUIRED_METHODS) -> list[str]:
    """Every problem with a results dict (empty list = complete and consistent). `required`: the methods every
    setting must have (all of REQUIRED_METHODS unless the run was restricted with --methods)."""
    problems: list[str] = []
    if not results:
        return ["results.json has no settings"]
    for setting, block in results.items():
        if set(block) != {"setting", "methods"}:
            problems.append(f"{setting}: keys must be 'setting' and 'methods', got {sorted(block)}")
            continue
        methods = block["methods"]
        if (block["setting"] or {}).get("kind") == "continual":
            problems += _continual_problems(setting, methods)
            continue
        for name in required:
            if name not in methods:
                problems.append(f"{setting}: method {name!r} missing")
        for name, row in methods.items():
            for field in REQUIRED_FIELDS:
                if field not in row:
                    problems.append(f"{setting}/{name}: field {field!r} missing")
                    continue
                value = row[field]
                if field in COST_FIELDS and not is_trained(name):
                    if value is not None:
                        problems.append(f"{setting}/{name}: {field} must be null (nothing is trained)")
                elif field == "seeds":
                    if not isinstance(value, int) or value < 1:
                        problems.append(f"{setting}/{name}: seeds must be a positive int, got {value!r}")
                elif not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                    problems.append(f"{setting}/{name}: {field} must be a finite number, got {value!r}")
    return problems


def _continual_problems(setting: str, methods: dict[str, Any]) -> list[str]:
    problems = [] if methods else [f"{setting}: no method"]
    for name, sequences in methods.items():
        for seq, block in sequences.items():
            for row in block.get("rounds") or [None]:
                missing = [f for f in CONTINUAL_FIELDS if row is None or f not in row]
                if missing:
                    problems.append(f"{setting}/{name}/{seq}: round fields {missing} missing")
    return problems


def write_results(path: Path, results: dict[str, Any], required: Iterable[str] = REQUIRED_METHODS) -> None:
    problems = validate_results(results, required)
    if problems:
        raise ValueError("bench results are incomplete: " + "; ".join(problems))
    path.write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")


def field_doc_table(fields: Iterable[str]) -> list[list[str]]:
    rows = [["field", "meaning", "better"]]
    for f in fields:
        meaning, direction = FIELD_DOCS[f]
        rows.append([f"`{f}`", meaning, direction])
    return rows


__all__ = [
    "CONTINUAL_FIELDS",
    "COST_FIELDS",
    "FIELD_DOCS",
    "REQUIRED_FIELDS",
    "REQUIRED_METHODS",
    "field_doc_table",
    "is_trained",
    "validate_results",
    "write_results",
]
