"""The learning invariants of D-OPSD steps, checked on the networks the real-scale check trains: every LoRA tensor
gets a gradient (after the first step, whose zero-initialised B leaves A's gradient zero), the EMA teacher moved,
and the student's and the EMA teacher's velocities on one input differ when their weights differ, by more than
the student's own repeat (a forward is deterministic here; a weight-swap bug would make them equal)."""

from __future__ import annotations

from typing import Any, Callable

import torch


def zero_grad_tensors(trainable: dict[str, torch.nn.Parameter]) -> list[str]:
    return [n for n, p in trainable.items() if p.grad is None or not bool(p.grad.any())]


@torch.no_grad()
def velocity_checks(
    velocity: Callable[..., torch.Tensor],
    shadow: Any,
    trainable: dict[str, torch.nn.Parameter],
    x: torch.Tensor,
    sigma: torch.Tensor,
    context: Any,
    autocast: Any,
    ema0: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The student's velocity twice and the EMA teacher's once (its weight swap), under the run's autocast."""
    with autocast():
        v1, v2, vt = velocity(x, sigma, context), velocity(x, sigma, context), shadow.wrap(velocity)(x, sigma, context)
    weights = max((p.detach().float() - shadow.shadow[n].float()).abs().max().item() for n, p in trainable.items())
    moved = [(shadow.shadow[k].float() - v.float()).abs().max().item() for k, v in ema0.items()]
    return {
        "weights_max_abs_diff": weights,
        "student_repeat_max_abs_diff": (v1 - v2).abs().max().item(),
        "student_teacher_max_abs_diff": (v1 - vt).abs().max().item(),
        "velocities_finite": bool(torch.isfinite(v1).all() and torch.isfinite(vt).all()),
        "ema_tensors": len(moved),
        "ema_unmoved_tensors": sum(d == 0 for d in moved),
    }


def holds(checks: dict[str, Any], zero_last: int) -> bool:
    differ = checks["weights_max_abs_diff"] > 0
    return bool(
        zero_last == 0
        and checks["ema_unmoved_tensors"] == 0
        and checks["velocities_finite"]
        and (not differ or checks["student_teacher_max_abs_diff"] > checks["student_repeat_max_abs_diff"])
    )
