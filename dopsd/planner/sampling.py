"""The sampling phase between training steps: sample grids and few-step health, no grad, with the VAE decode.

At each sampling interval (and before and after training) the trainer (dopsd.training.monitor) samples its grid
prompts × seeds at the few-step setting and the many-step control, under the run's autocast, and the few-step
health (dopsd.training.health) samples its own prompts × seeds without autocast; both in sampler batches of
`dopsd.core.sampler.sample_batch` images (one at 1024²), each batch decoded by the adapter's own decode (which
bounds its VAE calls itself). Everything of training stays on the device meanwhile (weights, the last step's
gradients, optimizer state, shadows, the VAE), so the phase's peak is those bytes plus the largest of:

  grid     one denoiser forward at the grid's sampler batch (student caption context, the Euler update)
  health   the same at the health check's batch, without autocast
  decode   the adapter's decode of one sampler batch, with and without autocast

measured on fake tensors like the step's phases (dopsd.planner.measure: depth-extrapolated denoiser, fused
attention); a quantized base adds one dequantized weight at a time to the forwards (counted by the caller).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dopsd.core.sampler import inference_mode, sample_batch
from dopsd.planner.fake import build_meta, fused_attention, new_mode, to_fake
from dopsd.planner.measure import (
    FULL_DEPTH_BELOW,
    Phase,
    Setting,
    Window,
    _autocast,
    _device,
    build_denoiser,
    depth_points,
    extrapolate,
    full_depth_params,
)

GRID_MOST = 8  # the grids' sampler batch at small sizes (dopsd.training.monitor)
HEALTH_PROMPTS, HEALTH_SEEDS = 4, 2  # the health check's defaults (dopsd.training.monitor.make_health)


def sampler_batches(cfg: Any, height: int, width: int) -> dict[str, int]:
    """Images per sampler batch of the grids and (when the run measures it) the health check at height×width, as
    the trainer picks them from the config (dopsd.training.monitor)."""
    s = cfg.sample
    prompts = len(s.prompts) or s.num_prompts
    out = {"grid": sample_batch(height, width, min(GRID_MOST, prompts * len(s.seeds)))}
    if s.health and not cfg.model.editing:
        n = len(s.health_prompts) or min(HEALTH_PROMPTS, len(cfg.method.prior_prompts) or prompts)
        out["health"] = sample_batch(height, width, n * min(HEALTH_SEEDS, len(s.seeds)))
    return out


def _forward(spec: Any, setting: Setting, overrides: dict[str, int], batches: dict[str, int]) -> dict[str, Phase]:
    """One sampler step of each sampler batch (no grad) on the denoiser built with `overrides` (depth)."""
    device = _device(setting)
    network = build_denoiser(spec, setting, overrides)
    mode = new_mode() if device == "cpu" else None
    if mode is not None:
        to_fake(network, mode)
    h, w = setting.height, setting.width
    shape, call = spec.latent_shape(h, w), spec.student(h, w)
    resident = list(network.parameters()) + list(network.buffers())
    out: dict[str, Phase] = {}
    scope = mode if mode is not None else torch.device("meta")
    with scope, fused_attention(setting.target == "gpu"), inference_mode(network):
        for name, batch in batches.items():
            cast = _autocast(setting) if name == "grid" else contextlib.nullcontext()
            tr = Window(resident)
            with tr, cast:
                x = torch.randn(batch, *shape)
                s = torch.full((batch,), 0.5)
                x = x + (-0.1) * spec.velocity(network, x, s, call.context(batch))
            out[name] = Phase(tr.peak, float(tr.flops))
    return out


def decode_peak(spec: Any, setting: Setting, batch: int) -> float:
    """Peak bytes of the adapter's decode of one sampler batch, with the run's autocast and without."""
    if spec.decode is None:
        return 0.0
    mode = new_mode()  # fake CPU tensors: autocast has no meta backend
    vae = to_fake(build_meta(lambda: spec.parts["vae"]({}), spec.dtype).eval().requires_grad_(False), mode)
    resident = list(vae.parameters()) + list(vae.buffers())
    peak = 0.0
    with mode, torch.no_grad():
        for cast in (_autocast(setting), contextlib.nullcontext()):
            tr = Window(resident)
            with tr, cast:
                spec.decode({"vae": vae}, torch.randn(batch, *spec.latent_shape(setting.height, setting.width)))
            peak = max(peak, tr.peak)
    return peak


def measure_sampling(spec: Any, setting: Setting, batches: dict[str, int], exact: bool | None = None) -> dict[str, Any]:
    """Bytes beyond the resident tensors of each part of the sampling phase (module doc), at the full depth."""
    if exact is None:
        exact = not spec.depth or full_depth_params(spec) < FULL_DEPTH_BELOW
    if exact:
        forward = _forward(spec, setting, {}, batches)
    else:
        forward = extrapolate(spec, [_forward(spec, setting, o, batches) for o in depth_points(spec)])
    out = {name: p.peak for name, p in forward.items()}
    out["decode"] = decode_peak(spec, setting, max(batches.values()))
    return out
