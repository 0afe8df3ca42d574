"""Few-step health during training: does the fine-tuned model still sample well at its own few steps?

The classic failure of fine-tuning a step-distilled model with a flow-matching (SFT) loss is that the
network drifts back toward an ordinary multi-step flow model: its few-step samples blur toward the mean of
the modes a caption allows, while many-step samples stay fine. `FewStepHealth` watches exactly that on a
few fixed prompts and noises, for any model family, against the starting model:

  * sharpness – mean |Laplacian| (high-frequency energy) of the decoded few-step samples relative to the
    starting model's, two-sided: the ratio r scores min(r, 1/r). Blur and washed-out objects lower r; noise
    raises it (a model that samples noise is as broken as one that blurs), so both lower the score; 1.0 =
    unchanged. It also moves when the content of the fixed prompts changes on purpose (a concept's colour), so
    unrelated prompts measure it best.
  * structure – image-scale contrast (`structure`: the samples averaged down to 8×8 cells, their spread), now /
    at start. Blur keeps it; noise averages out of it and flat, black or saturated samples have none, so it
    falls when the samples stop showing a layout at all. One-sided: only its loss is scored. It also moves with
    intended content changes (a new colour on the fixed prompts: ~0.8 in a sound D-OPSD run on the miniature),
    so it only feeds `broken` below, not `health`.
  * gap – the few-step samples' relative L2 distance to the *same network's* many-step samples from the same
    noise, scored 1 − (gap now − gap at start). Logged and counted for `broken` only, not for `health`: on the
    miniature it never fell in SFT runs that lost few-step quality (0.99–1.06) and fell to 0.91 in a sound
    D-OPSD run that kept it (training the few-step roll-out moves the untrained many-step samples).
  * quality (optional) – a decoder-based quality, now / at start: `quality_fn(images, prompts)`; by default
    ("auto") the model family's own (`adapter.health_quality(prompts)`: the miniature decodes its renders, the
    real families have none).

`health` is the minimum of sharpness and quality (HEALTH_SCORES; on real models: sharpness alone), the fraction
of the starting model's few-step quality kept by its weakest measure. `warning` is set when it falls below
`threshold`, default 0.94: calibrated on the miniature (benchmarks/mini_health_calibration.py,
docs/measured/health-calibration.json) with the trainer's setting (mini.yaml's 4 prior prompts × seeds 0, 1,
32-step control) against the bench's few-step quality on 128 unrelated prompts, "damaged" meaning ≥ 5% of it
lost: concept LoRAs on the 3 held-out concepts (orange, pink, teal), SFT and D-OPSD with and without prior
preservation, 108 measurements. The threshold chosen on two concepts and tested on the third missed 0 of 48
damaged measurements and raised 0 false alarms on 36 of D-OPSD runs that kept their quality; every SFT run
warned at the first sample step its measured loss reached 5% (sharpness 0.92–0.93 at 6–6.5% lost, 0.85–0.89
at 10–13% lost); D-OPSD scored ≥ 0.977. The earlier min(sharpness, gap) at 0.93 missed 2 of 48 and raised 2 false alarms
(the gap, in D-OPSD). Intended content changes of the health prompts move the scores (a concept's colour on
them), so unrelated prompts measure it best; when a run has neither `sample.health_prompts` nor
`method.prior_prompts` the trainer samples the training prompts and warns below TRAINING_PROMPTS_THRESHOLD
(0.905, same calibration: held out, 4 of 48 missed and 3 of 36 false alarms; the earlier 0.85 missed 9 of 48).

`broken` is set when the samples are not finite or any score (structure included) falls below `broken_below`
(0.5: half its starting value or worse, e.g. half the image-scale contrast left, or the high-frequency energy
halved or doubled): training produced a broken model, not a degraded one (measured on the miniature's unrelated
prompts: SFT's blur at 100 steps without prior preservation scores 0.71, sound D-OPSD runs ≥ 0.78 on every score
(structure, which a new colour moves, 0.78–1.03), runs with a learning rate 100–600× too high that sample noise
0.25–0.39 on structure).
The trainer reports a run whose final measurement is broken as failed (summary.json status "unhealthy").
The untouched model scores exactly 1.0 (fixed noise, deterministic forward).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dopsd.core.sampler import generate, sample_batch
from dopsd.models.base import ModelAdapter, QualityFn

# What a low score of each kind means (for warnings); sharpness depends on the direction it moved.
MEANING: dict[str, Callable[[float], str]] = {
    "sharpness": lambda r: (
        "blur: less fine detail than the starting model, the classic SFT failure"
        if r < 1
        else "noise: more high-frequency energy than the starting model"
    ),
    "structure": lambda r: "the samples lost their image-scale layout: noise, flat or saturated images",
    "gap": lambda r: "the few-step samples moved away from the same model's many-step samples",
    "quality": lambda r: "the decoder-based few-step quality fell",
}

HEALTH_THRESHOLD = 0.94  # warn below: ≥5% of the measured few-step quality lost (module doc; calibrated)
TRAINING_PROMPTS_THRESHOLD = 0.905  # the same on the training prompts, which the intended change itself moves
HEALTH_SCORES = ("sharpness", "quality")  # what `health` is the minimum of (structure and gap: `broken` only)

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Mean |Laplacian| per image (B,) of images (B, C, H, W): high-frequency energy; blur lowers it.

    Not normalised by contrast on purpose: few-step failure shows as washed-out objects as much as soft edges
    (measured on the miniature: the base at 4 steps loses 25% of its spread but gains contrast-normalised detail).
    """
    x = images.float()
    c = x.shape[1]
    kernel = _LAPLACIAN.to(x).expand(c, 1, 3, 3)
    lap = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
    return lap.abs().flatten(1).mean(1)


def structure(images: torch.Tensor, cells: int = 8) -> torch.Tensor:
    """Image-scale contrast per image (B,): each channel averaged down to at most cells×cells, the spread of those
    cell means, averaged over channels. The layout of a picture survives the averaging; pixel noise does not."""
    x = images.float()
    pooled = F.adaptive_avg_pool2d(x, (min(cells, x.shape[-2]), min(cells, x.shape[-1])))
    return pooled.flatten(2).std(2).mean(1)


def relative_gap(few: torch.Tensor, many: torch.Tensor) -> torch.Tensor:
    """‖few − many‖ / ‖many‖ per sample (B,)."""
    diff = (few.float() - many.float()).flatten(1).norm(dim=1)
    return diff / many.float().flatten(1).norm(dim=1).clamp_min(1e-6)


class FewStepHealth:
    """Few-step quality of the network being trained, relative to the starting model (see module doc)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        prompts: Sequence[str],
        *,
        height: int,
        width: int,
        seeds: Sequence[int] = (0,),
        steps: int | None = None,
        control_steps: int = 24,
        threshold: float = HEALTH_THRESHOLD,
        broken_below: float = 0.5,
        quality_fn: QualityFn | None | str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("FewStepHealth needs at least one prompt (e.g. the trainer's sample prompts)")
        if not seeds:
            raise ValueError("FewStepHealth needs at least one seed")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"health threshold must lie in (0, 1), got {threshold}")
        if control_steps < 0:
            raise ValueError(f"control_steps must be >= 0, got {control_steps}")
        self.adapter = adapter
        if not 0.0 < broken_below <= threshold:
            raise ValueError(f"broken_below must lie in (0, threshold], got {broken_below}")
        self.threshold = float(threshold)
        self.broken_below = float(broken_below)
        self.quality_fn = adapter.health_quality(list(prompts)) if quality_fn == "auto" else quality_fn
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        # One sample per (prompt, seed); prompts repeat seed-major so a grid row is one seed.
        self.prompts = [p for _ in seeds for p in prompts]
        # Encoded now, once: the trainer may free the encoders later.
        self.contexts = adapter.student_contexts(list(self.prompts))
        shape = tuple(adapter.latent_shape(height, width))
        self.noise = torch.cat(
            [torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        )
        # Every sample in one batch at small sizes; one image per batch at 1024² (dopsd.core.sampler.SAMPLE_PIXELS).
        self.batch = sample_batch(height, width, len(self.prompts))
        self.schedule = adapter.inference_schedule(height, width, steps)
        # The control: the model's own schedule at many steps (what the trainer's control grid uses too).
        self.control = adapter.inference_schedule(height, width, control_steps) if control_steps > 0 else None
        self.start: dict[str, float] | None = None
        self.finite = True  # whether the last samples were finite before clamping
        self.last_images: torch.Tensor | None = None

    # --- sampling -----------------------------------------------------------------------------------
    def _sample(self, network: nn.Module, control: bool = True) -> dict[str, torch.Tensor]:
        # Batches of self.batch, latents float32 unless told otherwise (as the trainer's grids; adapters cast inside).
        sample = lambda schedule: generate(
            self.adapter,
            network,
            self.contexts,
            self.noise,
            schedule,  # noqa: E731
            batch_size=self.batch,
            device=self.device,
            dtype=self.dtype,
        )
        out = {"few": sample(self.schedule)}
        if self.control is not None and control:
            out["many"] = sample(self.control)
        self.finite = all(bool(torch.isfinite(v).all()) for v in out.values())
        return {k: torch.nan_to_num(v, nan=0.0).clamp(-1, 1) for k, v in out.items()}

    def _raw(self, network: nn.Module, control: bool = True) -> dict[str, float]:
        images = self._sample(network, control)
        self.last_images = images["few"]
        raw = {"sharpness": float(sharpness(images["few"]).mean()), "structure": float(structure(images["few"]).mean())}
        if "many" in images:
            raw["gap"] = float(relative_gap(images["few"], images["many"]).mean())
        if self.quality_fn is not None:
            raw["quality"] = float(self.quality_fn(images["few"], list(self.prompts)))
        return raw

    # --- public -------------------------------------------------------------------------------------
    def reference(self, network: nn.Module) -> dict[str, float]:
        """Measure the starting model (call before the first optimizer step)."""
        self.start = self._raw(network)
        return dict(self.start)

    def measure(self, network: nn.Module, control: bool = True) -> dict[str, Any]:
        """Health of `network` now vs the reference: {'health', 'sharpness', 'structure', 'gap'?, 'quality'?,
        'raw/…', 'start/…', 'sharpness_ratio', 'broken', 'problem', 'warning'}. `control=False`: the cheap check
        of the few-step samples alone (no many-step control, so no gap score), e.g. when a checkpoint is written."""
        if self.start is None:
            raise RuntimeError("FewStepHealth.measure() before reference(): measure the starting model first")
        raw = self._raw(network, control)
        ratio = raw["sharpness"] / max(self.start["sharpness"], 1e-8)
        scores = {
            "sharpness": min(ratio, 1.0 / ratio) if ratio > 0 else 0.0,
            "structure": raw["structure"] / max(self.start["structure"], 1e-8),
        }
        if "gap" in raw:
            scores["gap"] = 1.0 - (raw["gap"] - self.start["gap"])
        if "quality" in raw:
            scores["quality"] = raw["quality"] / self.start["quality"] if self.start["quality"] > 0 else 1.0
        # The gap is logged and counts for `broken` only: it grows in sound D-OPSD runs whose few-step quality holds
        # and stays flat in SFT runs that lose it (module doc), so in `health` it only raised false alarms.
        quality_scores = {k: v for k, v in scores.items() if k in HEALTH_SCORES}
        worst = min(quality_scores, key=quality_scores.get)  # type: ignore[arg-type]
        health = scores[worst]
        lowest = min(scores, key=scores.get)  # type: ignore[arg-type]
        out: dict[str, Any] = {"health": health, **scores}
        out.update({f"raw/{k}": v for k, v in raw.items()})
        out.update({f"start/{k}": v for k, v in self.start.items()})
        out["sharpness_ratio"] = ratio
        steps = len(self.schedule) - 1
        out["broken"] = not self.finite or scores[lowest] < self.broken_below
        out["problem"] = None
        if not self.finite:
            out["problem"] = f"the few-step samples are not finite (NaN/inf) at {steps} steps"
        elif out["broken"]:
            out["problem"] = (
                f"the few-step samples at {steps} steps are broken, {lowest} score {scores[lowest]:.2f} "
                f"of the starting model's 1.00 (below {self.broken_below:.2f}): {MEANING[lowest](ratio)}"
            )
        out["warning"] = None
        if out["broken"]:
            out["warning"] = (
                f"few-step health {health:.2f}, broken: {out['problem']}. Training is breaking the "
                "model: lower optim.lr; compare the few-step and many-step sample grids."
            )
        elif health < self.threshold:
            out["warning"] = (
                f"few-step health {health:.2f} < {self.threshold:.2f} ({worst} score {scores[worst]:.2f} vs the "
                f"starting model's 1.00: {MEANING[worst](ratio)}): the model is losing its few-step quality at "
                f"{steps} steps. Lower the learning rate, add preservation, or use D-OPSD instead of SFT; compare "
                f"the few-step and many-step sample grids."
            )
        return out

    @staticmethod
    def scalars(result: dict[str, Any], prefix: str = "health/") -> dict[str, float]:
        """The numeric entries of a `measure()` result, prefixed for TensorBoard."""
        return {f"{prefix}{k}": float(v) for k, v in result.items() if isinstance(v, (int, float)) and v is not None}


__all__ = ["FewStepHealth", "sharpness", "structure", "relative_gap"]
