"""`train.gradient_checkpointing: auto`, resolved with the plan: off when the configured method's run peak
without checkpointing fits the GPU (the recomputed forward is then pure cost: a student forward+backward does
about 4/3 of its work with it), on when only that fits. On the CPU it resolves to off (host memory; see
dopsd.training.speed, which decides what reaches the trainer unresolved).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dopsd.planner.plan import plan
from dopsd.planner.resident import GiB
from dopsd.planner.search import fits
from dopsd.training.speed import CPU_REASON


def planned_method(method: Any) -> str:
    """Which of the plan's methods a configured objective is (the D-OPSD-form terms and their prior)."""
    if method.name in ("dopsd", "hybrid", "offpolicy"):
        return "dopsd_prior" if method.prior_weight > 0 and method.prior_prompts else "dopsd"
    return "sft"


def resolve(cfg: Any, device_bytes: int | None = None) -> tuple[bool, str]:
    """(on, why) for the config on this machine's first CUDA device (or a device of `device_bytes` bytes)."""
    value = cfg.train.gradient_checkpointing
    if value != "auto":
        return bool(value), f"train.gradient_checkpointing={str(bool(value)).lower()}"
    on_cpu = cfg.train.device == "cpu" or (device_bytes is None and not torch.cuda.is_available())
    if on_cpu:
        return False, CPU_REASON
    if device_bytes is None:
        device_bytes = torch.cuda.get_device_properties(0).total_memory
    card = device_bytes / GiB
    name = planned_method(cfg.method)
    entry = plan(cfg, search=False)["methods"][name]
    without = entry["run_peak_gb"] * GiB
    if fits(without, card):
        return False, (
            f"auto: off (planned {name} run peak without it {without / GiB:.1f} GiB + 1 GiB CUDA context fits "
            f"this GPU's {card:.1f} GiB)"
        )
    if "peak_with_gc_gb" not in entry:  # the plan had no checkpointing to measure
        return False, f"auto: off (the model has no gradient checkpointing; planned {without / GiB:.1f} GiB)"
    with_gc = entry["peak_with_gc_gb"]
    return True, (
        f"auto: on (planned {name} run peak without it {without / GiB:.1f} GiB does not fit this GPU's "
        f"{card:.1f} GiB; training peak with it {with_gc:.1f} GiB)"
    )


def resolved(cfg: Any, device_bytes: int | None = None) -> tuple[Any, str]:
    """A copy of the config with `auto` replaced by the resolved choice, and why."""
    on, why = resolve(cfg, device_bytes)
    train = dataclasses.replace(cfg.train, gradient_checkpointing=on)
    return dataclasses.replace(cfg, train=train), why
