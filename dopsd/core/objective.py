"""Model-free training losses: D-OPSD (on-policy self-distillation), its baselines, and their σ samplers.

Convention: x_σ = (1−σ)·x0 + σ·ε, σ=1 pure noise; velocity v = ε − x0; x0 = x_σ − σ·v.

The losses talk to callables with one signature, `velocity(x, σ, context) -> v`:
  * `student` – the trainable weights, called with gradient;
  * `teacher` / `reference_model` – other values of the same weights (EMA / base / live, see
    `dopsd.core.weights`), called under no_grad.
Contexts are opaque: the student gets the caption-only context (what inference uses), the D-OPSD teacher the
caption + target-image context; in D-OPSD the target image is never a regression target.

What lives here: `dopsd_loss` (D-OPSD; with rollout="teacher" the off-policy distillation ablation),
`sft_loss` (flow matching; also SFT on teacher samples and both DreamBooth terms, which are only other
inputs to it), `pso_loss` (Pairwise Sample Optimization), and the σ samplers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, ContextManager, Literal, Protocol, Sequence

import torch

from dopsd.core.schedules import check_schedule


class VelocityFn(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: Any) -> torch.Tensor: ...


LossSpace = Literal["x0", "velocity"]
Rollout = Literal["student", "teacher"]


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
    # The roll-out's result (detached): the student's own sample (rollout="student"), or the teacher's
    # caption + image sample (rollout="teacher"), i.e. an SFT-on-teacher-samples target for free.
    final: torch.Tensor | None = None


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
    rollout: Rollout = "student",
    states: Collection[int] | None = None,
) -> DistillOutput:
    """One D-OPSD loss: roll out the student from `noise` on `schedule`, matching the teacher at each state.

    rollout="student" (D-OPSD, on-policy): the student's own Euler step advances the state, so the states are
    those the student visits at inference. rollout="teacher" (the off-policy distillation of the D-OPSD
    paper's training-strategy ablation, Fig. 6a; its exact form there is not public, this reading is
    inferred): the teacher's Euler step advances the state, so the student is matched at the teacher's own
    caption + image roll-out states. Everything else (loss space, weights, per-step backward) is shared.

    backward=None keeps all K graphs and returns a loss to differentiate once ("accumulate").
    backward=fn calls fn(loss_k / K) right after each step ("per-step"): the same gradient, because the
    states are detached, with 1/K of the activation memory. `step_context(is_last_step)` wraps each
    step's forward and backward (the trainer uses it to skip DDP gradient sync until the last step).

    states: train at these roll-out states only (indices 0…K−1; None = all K). The others only advance the
    roll-out, with a forward of the model that drives it, without a graph and without the other model's
    forward. The loss is then the mean over the k trained states, i.e. K/k × their share of the full mean:
    over a uniformly drawn subset an unbiased estimate of the full loss and gradient, at k/K of the backward
    and matching forwards (the states themselves are the same ones the full roll-out visits).
    """
    check_schedule(schedule)
    if rollout not in ("student", "teacher"):
        raise ValueError(f"rollout must be 'student' or 'teacher', got {rollout!r}")
    num_steps = len(schedule) - 1
    weights = [1.0] * num_steps if step_weights is None else [float(w) for w in step_weights]
    if len(weights) != num_steps:
        raise ValueError(f"step_weights has {len(weights)} entries for a {num_steps}-step schedule")

    trained = list(range(num_steps)) if states is None else sorted({int(k) for k in states})
    if not trained or not 0 <= trained[0] <= trained[-1] < num_steps:
        raise ValueError(f"states must be a non-empty subset of 0…{num_steps - 1}, got {states!r}")

    x = noise
    total: torch.Tensor | float = 0.0
    stats: list[StepStats] = []
    for k in range(num_steps):
        x = x.detach()  # roll-out state; no gradient across roll-out steps
        sigma = _per_sample(schedule[k], x)
        if k not in trained:  # only advance the roll-out: one forward of the model that drives it
            with torch.no_grad():
                if rollout == "student":
                    v_step = student(x, sigma, student_context)
                else:
                    v_step = teacher(x, sigma, teacher_context)
            stats.append(StepStats(float(schedule[k]), float("nan"), float("nan")))
            x = x + (float(schedule[k + 1]) - float(schedule[k])) * v_step
            continue
        with step_context(k == trained[-1]):
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
                backward(step_loss / len(trained))
                step_loss = step_loss.detach()
        total = total + step_loss
        gap = (_bcast(sigma, x) * (v_student - v_teacher)).detach().abs().mean()
        stats.append(StepStats(float(schedule[k]), float(step_loss.detach()), float(gap)))
        # One of the two velocities already computed advances the roll-out: no extra forward.
        v_step = v_student if rollout == "student" else v_teacher
        x = x + (float(schedule[k + 1]) - float(schedule[k])) * v_step.detach()
    return DistillOutput(total / len(trained), stats, x.detach())


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


def sample_schedule_sigmas(
    n: int, schedule: torch.Tensor, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """σ drawn uniformly from a few-step schedule's non-zero levels: the distilled model's own σ values.

    PSO trains at these (its released code: one of the 4 distilled SDXL-Turbo timesteps per pair).
    """
    check_schedule(schedule)
    levels = schedule[:-1].float()
    return levels[torch.randint(len(levels), (n,), generator=generator)].to(device)


def sft_loss(
    student: VelocityFn, x0: torch.Tensor, context: Any, sigma: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Flow-matching loss ‖v_θ(x_σ, σ, c) − (ε − x0)‖² with the caption-only context.

    Two baselines are this loss on other inputs, so they have no function of their own: SFT on teacher
    samples (x0 = the teacher's caption + image few-step sample, e.g. `dopsd_loss(..., rollout="teacher").final`),
    and DreamBooth (this loss on the targets + λ·this loss on class images of the untouched model with the
    class prompt's context, independent σ and noise: Ruiz et al. 2023, Eq. 2, λ = 1).
    """
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


# --- PSO: Pairwise Sample Optimization (Miao et al., ICLR 2025) ------------------------------------

PairForm = Literal["hinge", "dpo"]
ErrorWeighting = Literal["velocity", "noise"]


@dataclass
class PairOutput:
    loss: torch.Tensor  # scalar, differentiable
    target_error: torch.Tensor  # (B,) ℓ_θ on the targets (detached)
    reference_error: torch.Tensor  # (B,) ℓ_θ on the reference images (detached)
    margin: torch.Tensor  # (B,) > 0 when the pair is ranked right (the released code's `logits`)
    frozen_target_error: torch.Tensor | None = None  # form="dpo": ℓ of the reference model
    frozen_reference_error: torch.Tensor | None = None

    @property
    def implicit_accuracy(self) -> float:
        """Fraction of pairs with margin > 0 (logged as implicit_acc by the PSO code)."""
        return float((self.margin > 0).float().mean())


def per_sample_error(
    velocity: VelocityFn,
    x0: torch.Tensor,
    context: Any,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    weighting: ErrorWeighting = "velocity",
) -> torch.Tensor:
    """Per-sample flow-matching error (B,): mean‖v(x_σ, σ, c) − (ε − x0)‖² over each sample's elements.

    weighting="noise" multiplies by (1−σ)², which makes it the ε-prediction MSE ‖ε̂ − ε‖² (ε̂ = x_σ + (1−σ)v̂),
    the per-image loss of the PSO code (its EDM x0 error weighted σ_EDM⁻²); it vanishes at σ = 1.
    """
    x = noise_to(x0, noise, sigma)
    err = (velocity(x, sigma, context) - (noise - x0)).pow(2).flatten(1).mean(1)
    if weighting == "noise":
        err = err * (1 - sigma.to(err.dtype)) ** 2
    elif weighting != "velocity":
        raise ValueError(f"weighting must be 'velocity' or 'noise', got {weighting!r}")
    return err


def pso_loss(
    student: VelocityFn,
    x0_target: torch.Tensor,
    x0_reference: torch.Tensor,
    context: Any,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    *,
    beta: float = 5.0,
    ref_weight: float = 0.1,
    prior_weight: float = 0.5,
    form: PairForm = "hinge",
    reference_model: VelocityFn | None = None,
    weighting: ErrorWeighting = "velocity",
) -> PairOutput:
    """PSO on pairs (target image, reference image) forward-noised with the SAME noise and σ per pair.

    Both images are conditioned on the same `context` (the target's caption), as in the released
    concept-customisation code; the reference images are samples of the untouched distilled model (class
    prompt, its own few steps), made by the caller. With ℓ the per-sample error (`per_sample_error`),
    L_w = ℓ_θ(target), L_l = ℓ_θ(reference), γ = ref_weight, λ = prior_weight:
      form="hinge"  (the code's `pso_db`, what every released customisation script runs):
          margin = γ·L_l − L_w;                         loss = mean relu(1 − β·margin) + λ·mean L_l
      form="dpo"    (the code's `pso`, the paper's Diffusion-DPO form; R = ℓ of `reference_model`, the
                     frozen initial model, called under no_grad):
          margin = (R_w − γ·R_l) − (L_w − γ·L_l);       loss = mean −log σ(β·margin) + λ·mean L_l
    Defaults β=5, γ=0.1, λ=0.5 are the released scripts' (`--beta_pso 5`, `--neg_defactor` default 0.1,
    `--prior_loss_weight 0.5`; yaramohamadi/Pairwise_Sample_Optimization, the authors' code). While the hinge
    is active its gradient is β·∇L_w + (λ − βγ)·∇L_l, i.e. exactly 5·∇SFT on the targets with these
    defaults (our derivation). The velocity-MSE error is our translation to flow matching; weighting="noise"
    reproduces the code's ε-MSE weighting.
    """
    if form not in ("hinge", "dpo"):
        raise ValueError(f"PSO form must be 'hinge' or 'dpo', got {form!r}")
    if form == "dpo" and reference_model is None:
        raise ValueError("PSO form 'dpo' needs a reference_model (the frozen initial weights)")
    if x0_target.shape != x0_reference.shape or noise.shape != x0_target.shape:
        raise ValueError(
            f"PSO pairs need equal shapes: target {tuple(x0_target.shape)}, reference "
            f"{tuple(x0_reference.shape)}, noise {tuple(noise.shape)}"
        )
    loss_w = per_sample_error(student, x0_target, context, sigma, noise, weighting)
    loss_l = per_sample_error(student, x0_reference, context, sigma, noise, weighting)
    margin = ref_weight * loss_l - loss_w
    frozen_w = frozen_l = None
    if form == "dpo":
        with torch.no_grad():
            frozen_w = per_sample_error(reference_model, x0_target, context, sigma, noise, weighting)
            frozen_l = per_sample_error(reference_model, x0_reference, context, sigma, noise, weighting)
        margin = (frozen_w - ref_weight * frozen_l) + margin
        pair_loss = -torch.nn.functional.logsigmoid(beta * margin)
    else:
        pair_loss = torch.relu(1 - beta * margin)
    loss = pair_loss.mean() + prior_weight * loss_l.mean()
    return PairOutput(loss, loss_w.detach(), loss_l.detach(), margin.detach(), frozen_w, frozen_l)


__all__ = [
    "VelocityFn",
    "StepStats",
    "DistillOutput",
    "dopsd_loss",
    "sft_loss",
    "sample_training_sigmas",
    "sample_schedule_sigmas",
    "PairOutput",
    "per_sample_error",
    "pso_loss",
    "to_x0",
    "noise_to",
    "step_weights_for",
]
