"""Sampling at real scale without encoders: the trainer's sample grid and its few-step health check, run by dopsd's
own code (`dopsd.core.sampler.generate`, `dopsd.training.health.FewStepHealth`) through `SpecAdapter`, the adapter
calls they make on a `dopsd.models.base.PlanSpec`: the family's velocity and decode (the adapters' own code) and
random contexts of the shapes the trainer feeds the denoiser. The VAE is the full-size one with random weights."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import torch

GiB = 2**30
SPLIT_KEYS = ("cap_feats", "prompt_embeds", "ref_tokens")  # per-sample entries of a context batch


def randomize(obj: Any, device: torch.device, generator: torch.Generator) -> Any:
    """Contexts of the planner's shapes with random floats (ids kept), on the device."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            return torch.randn(obj.shape, generator=generator).to(device, obj.dtype)
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: randomize(v, device, generator) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(randomize(v, device, generator) for v in obj)
    return obj


def inference_schedule(cfg: Any, spec: Any, height: int, width: int, steps: int | None = None) -> torch.Tensor:
    """The adapter's inference schedule for this config (Z-Image: static shift; FLUX.2: klein's dynamic shift)."""
    from dopsd.core.schedules import shifted_schedule

    m = cfg.model
    if m.family == "flux2":
        from dopsd.models.flux2_facts import STEPS, flux2_schedule

        _, h, w = spec.latent_shape(height, width)
        return flux2_schedule(steps or m.inference_steps or STEPS, h * w)
    from dopsd.models.zimage import STEPS

    return shifted_schedule(steps or m.inference_steps or STEPS, m.shift if m.shift is not None else 3.0)


class SpecAdapter:
    """The ModelAdapter calls of sampling and health, on a PlanSpec (see the module doc)."""

    def __init__(self, cfg: Any, spec: Any, vae: torch.nn.Module, device: torch.device):
        from dopsd.models.registry import family_module

        self.cfg, self.spec, self.vae, self.device = cfg, spec, vae, device
        self.name, self.dtype = cfg.model.family, spec.dtype
        self.generator = torch.Generator().manual_seed(1)
        cls = next(
            v for k, v in vars(family_module(self.name)).items() if k.endswith("Adapter") and isinstance(v, type)
        )
        self._collate = lambda contexts: cls.collate(SimpleNamespace(device=device, dtype=self.dtype), contexts)

    def velocity(self, network: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: Any) -> torch.Tensor:
        return self.spec.velocity(network, x, sigma, context)

    def student_contexts(self, captions: list[str], sources: Any = None) -> list[dict[str, torch.Tensor]]:
        m = self.cfg.model
        batch = randomize(
            self.spec.student(m.height, m.width).context(len(captions)), torch.device("cpu"), self.generator
        )
        return [{k: batch[k][i] for k in SPLIT_KEYS if k in batch} for i in range(len(captions))]

    def collate(self, contexts: list[dict[str, torch.Tensor]]) -> Any:
        return self._collate(contexts)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.spec.decode({"vae": self.vae}, latents.to(self.device))

    def inference_schedule(self, height: int, width: int, steps: int | None = None) -> torch.Tensor:
        return inference_schedule(self.cfg, self.spec, height, width, steps)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return self.spec.latent_shape(height, width)

    def health_quality(self, prompts: list[str]) -> None:
        return None


def build_vae(spec: Any, device: torch.device) -> torch.nn.Module:
    with torch.device(device):
        vae = spec.parts["vae"]({})
    return vae.to(spec.dtype).eval().requires_grad_(False)


def _measure(device: torch.device, fn: Any) -> dict[str, Any]:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    result: dict[str, Any] = {"seconds": round(time.perf_counter() - started, 2), "finite": bool(out)}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        result.update(
            resident_before_gb=before / GiB,
            peak_allocated_gb=peak / GiB,
            peak_reserved_gb=torch.cuda.max_memory_reserved() / GiB,
            above_resident_gb=(peak - before) / GiB,
        )
    else:
        result.update(resident_before_gb=None, peak_allocated_gb=None, peak_reserved_gb=None, above_resident_gb=None)
    return result


def run_sampling(net: torch.nn.Module, cfg: Any, spec: Any, device: torch.device, full: bool = True) -> dict[str, Any]:
    """The trainer's sampling between steps on `net` (its LoRA in place): the sample grid (sample.num_prompts
    prompts × sample.seeds, at the few-step setting and, when `full`, at sample.control_steps) and, when `full`,
    the few-step health check (4 prompts × 2 seeds, few steps + control); the grids under the trainer's autocast,
    the health check without (as dopsd.training.monitor runs them); time, peak memory and the peak above what was
    resident before, each."""
    from dopsd.core.sampler import generate, sample_batch, sample_seed, seed_noise
    from dopsd.training.health import FewStepHealth

    s, m = cfg.sample, cfg.model
    vae = build_vae(spec, device)
    adapter = SpecAdapter(cfg, spec, vae, device)
    prompts = [f"prompt {i}" for i in range(len(s.prompts) or s.num_prompts)]
    seeds = list(s.seeds)
    contexts = [c for c in adapter.student_contexts(prompts) for _ in seeds]
    noise = seed_noise(
        spec.latent_shape(m.height, m.width), [sample_seed(x, i) for i in range(len(prompts)) for x in seeds]
    )
    batch = sample_batch(m.height, m.width, 8)  # as the trainer's grids (dopsd.training.monitor)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")
    out: dict[str, Any] = {"images": len(contexts), "batch": batch, "resolution": [m.height, m.width]}

    def grid(steps: int | None) -> bool:
        with autocast:
            images = generate(
                adapter, net, contexts, noise, adapter.inference_schedule(m.height, m.width, steps), batch, device
            )
        return bool(torch.isfinite(images).all())

    out["grid"] = _measure(device, lambda: grid(None))
    out["grid"]["steps"] = len(adapter.inference_schedule(m.height, m.width)) - 1
    if not full:
        del vae
        return out
    if s.control_steps > 0:
        out["control_grid"] = {**_measure(device, lambda: grid(s.control_steps)), "steps": s.control_steps}
    health = FewStepHealth(
        adapter,
        prompts[:4],
        height=m.height,
        width=m.width,
        seeds=tuple(seeds[:2]),
        steps=m.inference_steps,
        control_steps=s.control_steps,
        device=device,
    )

    def measure() -> bool:  # without autocast, as the trainer measures it (outside its grids' autocast)
        health.reference(net)
        return health.finite

    out["health"] = {**_measure(device, measure), "images": len(health.prompts), "batch": health.batch}
    del vae
    return out
