"""The one sampler: Euler over the flow ODE dx/dσ = v(x, σ) in the project's σ convention (σ=1 noise, σ=0 clean).

`sample_euler(velocity, noise, sigmas, context)` is the inference sampler of every target model (the few-step
turbos and their many-step controls alike); `generate` batches per-sample contexts, samples with an adapter's
velocity and decodes; `seed_noise` gives one fixed noise per seed, independent of batch composition and device,
so that the same seed gives the same image in a grid, a health check, a probe or a comparison.
`sample_seed(seed, prompt_index)` is the noise seed of one (prompt, seed) sample of `dopsd sample`: every prompt
of a grid gets its own noise, and one sample can be drawn again alone from its seed and prompt index.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from dopsd.core.schedules import check_schedule


def sample_euler(velocity, noise: torch.Tensor, sigmas: torch.Tensor, context=None) -> torch.Tensor:
    """Plain Euler sampler of the flow ODE dx/dσ = v(x, σ); the inference sampler of every target model."""
    check_schedule(sigmas)
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
        x = x + (float(sigma_next) - float(sigma)) * velocity(x, s, context)
    return x


def seed_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """One fixed noise per seed (float32, CPU), independent of batch composition and device."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


# An odd 64-bit constant (2^64 / golden ratio): consecutive prompt indices land far apart in seed space.
PROMPT_STRIDE = 0x9E3779B97F4A7C15


def sample_seed(seed: int, prompt_index: int) -> int:
    """Noise seed of the sample (prompt number `prompt_index`, counting from 0, with `seed`):
    (seed + prompt_index × 0x9E3779B97F4A7C15) mod 2^63. Prompt 0 uses the seed itself, so its noise is
    `seed_noise(shape, [seed])`, the same as the training grids' for that seed."""
    return (int(seed) + int(prompt_index) * PROMPT_STRIDE) % 2**63


# A sampling batch (denoiser calls and their decode) holds at most this many pixels, and at least one image: one
# image at 1024², four at 512², the whole batch at small sizes. Decoding eight 1024² images in one VAE call held
# ~12 GiB of activations during training, more than the training step itself (`dopsd plan` counts this phase).
SAMPLE_PIXELS = 1024 * 1024


def sample_batch(height: int, width: int, samples: int) -> int:
    """Images per sampling batch for `samples` images of height×width (see SAMPLE_PIXELS)."""
    return max(1, min(int(samples), SAMPLE_PIXELS // (height * width)))


@contextmanager
def inference_mode(network: torch.nn.Module) -> Iterator[None]:
    """Sampling as at inference, also in the middle of training: no gradient, and dropout (LoRA dropout included)
    off; the network's training flag is restored afterwards."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        network.train(was_training)


def generate(
    adapter: Any,
    network: torch.nn.Module,
    contexts: list[dict[str, torch.Tensor]],
    noise: torch.Tensor,
    schedule: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Euler samples for per-sample `contexts` from `noise`; decoded images (B, 3, H, W) in [-1, 1] on CPU.
    Latents are float32 unless `dtype` says otherwise (adapters cast to their weights' dtype inside)."""
    device, dtype = device or next(network.parameters()).device, dtype or torch.float32
    out = []
    with inference_mode(network):
        for start in range(0, len(contexts), batch_size):
            ctx = adapter.collate(
                [{k: v.to(device) for k, v in c.items()} for c in contexts[start : start + batch_size]]
            )
            x = noise[start : start + batch_size].to(device, dtype)
            x = sample_euler(lambda z, s, c: adapter.velocity(network, z, s, c), x, schedule.to(device), ctx)
            out.append(adapter.decode(x).float().cpu())
    return torch.cat(out)
