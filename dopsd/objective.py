"""The D-OPSD objective (on-policy self-distillation) and the SFT baseline, independent of any model.

Convention: x_σ = (1−σ)·x0 + σ·ε, σ=1 pure noise; velocity v = ε − x0; x0 = x_σ − σ·v.

The objective talks to two callables with the same signature, `velocity(x, σ, context) -> v`:
  * `student` – the trainable weights, called with gradient;
  * `teacher` – the teacher's weights (EMA / base / live, see `dopsd.weights`), called under no_grad.
Contexts are opaque: the student gets the caption-only context (what inference uses), the teacher the
caption + target-image context. The target image never appears here as a regression target.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Literal, Protocol, Sequence

import torch

from dopsd.schedules import check_schedule


class VelocityFn(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: Any) -> torch.Tensor: ...


LossSpace = Literal["x0", "velocity"]


def _per_sample(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """σ as a (B,) tensor on x's device."""
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def to_x0(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x - _bcast(sigma, x) * v


def noise_to(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * noise


@dataclass
class StepStats:
    sigma: float
    loss: float  # this step's (weighted) loss
    gap: float  # mean |x0_teacher − x0_student| at this state: how far the student is from the teacher


@dataclass
class DistillOutput:
    loss: torch.Tensor  # mean over steps; detached when the backward already ran per step
    steps: list[StepStats] = field(default_factory=list)
    final: torch.Tensor | None = None  # the student's own roll-out result (detached): a free sample


def _no_context(_last: bool) -> ContextManager:
    return contextlib.nullcontext()


def dopsd_loss(
    student: VelocityFn,
    teacher: VelocityFn,
    noise: torch.Tensor,
    schedule: torch.Tensor,
    student_context: Any,
    teacher_context: Any,
    *,
    space: LossSpace = "x0",
    step_weights: Sequence[float] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    step_context: Callable[[bool], ContextManager] = _no_context,
) -> DistillOutput:
    """One D-OPSD loss: roll out the student from `noise` on `schedule`, matching the teacher at each state.

    backward=None keeps all K graphs and returns a loss to differentiate once ("accumulate").
    backward=fn calls fn(loss_k / K) right after each step ("per-step"): the same gradient, because the
    states are detached, with 1/K of the activation memory. `step_context(is_last_step)` wraps each
    step's forward and backward (the trainer uses it to skip DDP gradient sync until the last step).
    """
    check_schedule(schedule)
    num_steps = len(schedule) - 1
    weights = [1.0] * num_steps if step_weights is None else [float(w) for w in step_weights]
    if len(weights) != num_steps:
        raise ValueError(f"step_weights has {len(weights)} entries for a {num_steps}-step schedule")

    x = noise
    total: torch.Tensor | float = 0.0
    stats: list[StepStats] = []
    for k in range(num_steps):
        x = x.detach()  # on-policy state; no gradient across roll-out steps
        sigma = _per_sample(schedule[k], x)
        with step_context(k == num_steps - 1):
            with torch.no_grad():
                v_teacher = teacher(x, sigma, teacher_context)
            v_student = student(x, sigma, student_context)
            diff = v_student - v_teacher
            if space == "x0":  # x0_s − x0_t = −σ (v_s − v_t): σ²-weighted velocity MSE
                diff = _bcast(sigma, x) * diff
            elif space != "velocity":
                raise ValueError(f"space must be 'x0' or 'velocity', got {space!r}")
            step_loss = weights[k] * diff.pow(2).mean()
            if backward is not None:
                backward(step_loss / num_steps)
                step_loss = step_loss.detach()
        total = total + step_loss
        gap = (_bcast(sigma, x) * (v_student - v_teacher)).detach().abs().mean()
        stats.append(StepStats(float(schedule[k]), float(step_loss.detach()), float(gap)))
        # The student's own Euler step advances the roll-out: no extra forward.
        x = x + (float(schedule[k + 1]) - float(schedule[k])) * v_student.detach()
    return DistillOutput(total / num_steps, stats, x.detach())


# --- SFT baseline: flow matching on the target images with the caption-only context -----------------

TimestepSampling = Literal["uniform", "logit_normal", "shifted"]


def sample_training_sigmas(
    n: int,
    sampling: TimestepSampling = "logit_normal",
    *,
    shift: float = 3.0,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """σ for flow-matching training: uniform, logit-normal (SD3) or uniform then statically shifted."""
    if sampling == "uniform":
        sigma = torch.rand(n, generator=generator)
    elif sampling == "logit_normal":
        sigma = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    elif sampling == "shifted":
        u = torch.rand(n, generator=generator)
        sigma = shift * u / (1 + (shift - 1) * u)
    else:
        raise ValueError(f"timestep sampling must be uniform, logit_normal or shifted, got {sampling!r}")
    return sigma.clamp(1e-4, 1.0).to(device)


def sft_loss(
    student: VelocityFn,
    x0: torch.Tensor,
    context: Any,
    sigma: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Flow-matching loss ‖v_θ(x_σ, σ, c) − (ε − x0)‖² with the caption-only context."""
    x = noise_to(x0, noise, sigma)
    return (student(x, sigma, context) - (noise - x0)).pow(2).mean()


def step_weights_for(name: str, schedule: torch.Tensor) -> list[float] | None:
    """Named per-step weightings: 'uniform' (None) or 'sigma' (∝ σ, renormalised to mean 1)."""
    if name == "uniform":
        return None
    if name == "sigma":
        s = schedule[:-1].double()
        return (s / s.mean()).tolist()
    raise ValueError(f"unknown step weighting {name!r}; use 'uniform' or 'sigma'")


__all__ = [
    "VelocityFn",
    "StepStats",
    "DistillOutput",
    "dopsd_loss",
    "sft_loss",
    "sample_training_sigmas",
    "to_x0",
    "noise_to",
    "step_weights_for",
]
