"""The human-readable form of a plan (the --json form is the plan dict itself)."""

from __future__ import annotations

from typing import Any

from dopsd.planner.search import CARDS, METHODS

ROWS = [
    ("frozen weights", "frozen_weights"),
    ("trainable weights", "trainable_weights"),
    ("gradients", "gradients"),
    ("optimizer state", "optimizer_state"),
    ("EMA teacher shadow", "ema_teacher"),
    ("prior shadow", "prior_shadow"),
    ("parts kept loaded (VAE)", "kept_parts"),
    ("step peak above resident", "step_peak_above_resident"),
    ("  of it activations", "activations"),
    ("  dequantization scratch", "dequant_scratch"),
    ("  dequantized, saved for backward", "dequant_saved_for_backward"),
]


def _row(label: str, values: list[Any], width: int = 12, scale: float = 1.0) -> str:
    cells = [(f"{v * scale:.2f}" if isinstance(v, float) else str(v)).rjust(width) for v in values]
    return f"  {label:<36}" + "".join(cells)


def _checkpointing(s: dict[str, Any]) -> str:
    if s.get("gradient_checkpointing_auto"):
        return "gradient checkpointing auto (planned without it; on where only that fits)"
    return "gradient checkpointing" if s["gradient_checkpointing"] else "no gradient checkpointing"


def text(plan: dict[str, Any]) -> str:
    s, m = plan["settings"], plan["methods"]
    small = max(m[x]["run_peak_gb"] for x in METHODS) < 1.0  # the miniature: MiB reads better
    unit, scale = ("MiB", 1024.0) if small else ("GiB", 1.0)
    lora = f"LoRA r{s['lora_rank']}" if s["lora_rank"] else "full fine-tune"
    h, w = plan["resolution"]
    lines = [
        f"{plan['model']}: {h}x{w}, batch {plan['batch']}, {lora}, "
        f"{_checkpointing(s)}, "
        f"{'8-bit AdamW' if s['optimizer'] == 'adamw8bit' else 'AdamW'}, weights {s['dtype']}, "
        f"base quantization {s['quantize']}, mixed precision {s['mixed_precision']}",
        "PREDICTIONS for one GPU (fake tensors on this CPU; nothing measured on a GPU)",
        "",
        _row(f"peak GPU memory, {unit}", list(METHODS)),
    ]
    row = lambda label, values: _row(label, values, scale=scale)  # noqa: E731
    for label, key in ROWS:
        lines.append(row(label, [m[x]["breakdown_gb"][key] for x in METHODS]))
    lines.append(row("training peak", [m[x]["peak_gb"] for x in METHODS]))
    other = "peak_without_gc_gb" if s["gradient_checkpointing"] else "peak_with_gc_gb"
    if other in m["sft"]:
        label = "  … without checkpointing" if s["gradient_checkpointing"] else "  … with checkpointing"
        lines.append(row(label, [m[x][other] for x in METHODS]))
    lines.append(row("teacher forward alone (activations)", ["-"] + [m[x]["teacher_fwd_gb"] for x in METHODS[1:]]))
    lines.append(row("student fwd+bwd alone (activations)", [m[x]["student_fwd_bwd_gb"] for x in METHODS]))
    lines.append(row("feature caching peak", [m[x]["caching_peak_gb"] for x in METHODS]))
    lines.append(row("sampling peak (grids, health)", [m[x]["sampling_peak_gb"] for x in METHODS]))
    lines.append(row("run peak (max of the three)", [m[x]["run_peak_gb"] for x in METHODS]))
    for card in CARDS:
        lines.append(
            _row(
                f"fits {card} GiB (+1 GiB CUDA context)", ["yes" if m[x]["fits"][str(card)] else "no" for x in METHODS]
            )
        )
    c = plan["compute"]
    lines += [
        "",
        "Compute per optimizer step (counted on the real architecture): "
        + ", ".join(f"{x} {c['per_step_tflops'][x] * 1e12:.3g} FLOPs" for x in METHODS),
        "  " + c["formula"],
    ]
    lines += [
        "",
        "Feature caching, before training (one encoder at a time beside the VAE, the denoiser loaded "
        "after; 'alone' = only the stage's own parts):",
    ]
    for st in plan["caching"]["stages"]:
        lines.append(
            f"  {st['name']}: {' + '.join(st['loaded'])} = {st['weights_gb'] * scale:.2f} + activations "
            f"{st['activations_gb'] * scale:.2f} = {st['peak_gb'] * scale:.2f} {unit} "
            f"(alone: {st['sequential_peak_gb'] * scale:.2f})"
        )
    smp = plan["sampling"]
    lines += [
        "",
        "Sampling between steps (no grad; "
        + smp["held"]
        + " stay loaded), images per sampler batch: "
        + ", ".join(f"{k} {v}" for k, v in smp["batches"].items())
        + "; activations "
        + ", ".join(f"{k} {v * scale:.2f}" for k, v in smp["activations_gb"].items())
        + f" {unit}",
    ]
    seq = plan["sequence"]
    lines += [
        "",
        "Sequence (tokens): student "
        + ", ".join(f"{k} {v}" for k, v in seq["student"].items())
        + "; teacher "
        + ", ".join(f"{k} {v}" for k, v in seq["teacher"].items()),
    ]
    for chk in plan["checks"]:
        lines.append(f"  {'ok  ' if chk['ok'] else 'FAIL'} {chk['what']}: {chk['detail']}")
    if any(plan.get("suggestions", {}).values()):
        lines += ["", "To fit a card it does not fit (fewest changes first; resolution and batch last):"]
        for method, per in plan["suggestions"].items():
            for card, found in per.items():
                if found is None:
                    lines.append(f"  {method} on {card} GiB: nothing within 3 changes of the searched settings")
                elif found.get("changes") is None:
                    lines.append(f"  {method} on {card} GiB: {found['reason']}")
                else:
                    lines.append(
                        f"  {method} on {card} GiB: {' '.join(found['changes'])} -> training "
                        f"{found['peak_gb']:.2f}, caching {found['caching_peak_gb']:.2f}, sampling "
                        f"{found['sampling_peak_gb']:.2f} GiB"
                    )
    lines += ["", f"How: {plan['measured']}."]
    for note in plan["notes"]:
        lines.append(f"Note: {note}")
    if plan["unseen"]:
        lines.append("Not seen by this prediction:")
        lines += [f"  - {u}" for u in plan["unseen"]]
    lines.append(f"({plan['seconds']} s)")
    return "\n".join(lines)
