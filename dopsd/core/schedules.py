"""σ schedules in the project's single convention: σ=1 is pure noise, σ=0 is the clean image.

A schedule is a 1-D float tensor σ_0 = 1 > σ_1 > … > σ_N = 0 (N steps, N+1 entries, the last one 0).
Model adapters translate σ into their own timestep convention and choose their shift; nothing here knows about a
model.
"""

from __future__ import annotations

import math

import torch


def static_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = sσ / (1 + (s−1)σ): spends more of the steps at high noise for s > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def exponential_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX-style time shift σ' = e^μ / (e^μ + 1/σ − 1); equals `static_shift` with s = e^μ."""
    return static_shift(sigma, math.exp(mu))


def _base_grid(steps: int) -> torch.Tensor:
    # The diffusers flow pipelines (Z-Image, FLUX.2) start from linspace(1, 1/N, N) before shifting.
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)


def _close(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def shifted_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Few-step inference schedule with a static shift (Z-Image-Turbo: 8 steps, shift 3)."""
    return _close(static_shift(_base_grid(steps), shift))


def dynamic_schedule(steps: int, mu: float) -> torch.Tensor:
    """Few-step inference schedule with a dynamic shift μ (`exponential_shift`); each model computes its own μ."""
    return _close(exponential_shift(_base_grid(steps), mu))


def training_schedule(inference: torch.Tensor, every: int = 1) -> torch.Tensor:
    """Roll-out schedule for D-OPSD from an inference schedule: every `every`-th σ, then 0.

    Z-Image-Turbo's 8-step schedule with every=2 gives 1, 0.9, 0.75, 0.5 → 0.
    """
    check_schedule(inference)
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return torch.cat([inference[:-1][::every], inference.new_zeros(1)])


def check_schedule(sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("a schedule is a 1-D tensor with at least two entries (…, 0)")
    if float(sigmas[-1]) != 0.0 or not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise ValueError(f"a schedule must decrease strictly and end at 0, got {sigmas.tolist()}")
    if float(sigmas[0]) > 1.0:
        raise ValueError(f"σ must lie in [0, 1], got {float(sigmas[0])}")
