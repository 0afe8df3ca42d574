"""The miniature's answers to the core's optional scoring hooks, from the renderer's ground truth
(dopsd.mini.metrics): `dopsd probe`'s attribute scorer and few-step health's decoder-based quality; and the
tint-invariant attribute checks the demo and the benchmark score samples with."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from dopsd.data.images import to_tensor
from dopsd.mini import metrics, world
from dopsd.models.base import QualityFn


class MiniScorer:
    """`dopsd probe`'s distance (dopsd.tools.probe.scorers.Scorer) between the decoded attributes of sample and target.

    d = |fg colour − target fg| + |bg colour − target bg| + shape_weight·[shape differs]  (RGB in [0, 1]);
    position and size are ignored (captions never fix them). A hit = fg within 0.25 of the target's and the
    same shape: the sample shows the target's concept.
    """

    name = "mini-attributes"

    def __init__(self, shape_weight: float = 1.0, hit_colour: float = 0.25) -> None:
        self.shape_weight, self.hit_colour = shape_weight, hit_colour

    def _decode(self, samples: torch.Tensor, targets: Sequence[Image.Image]):
        return metrics.decode(samples), metrics.decode(to_tensor(targets, tuple(samples.shape[-2:])))

    def distance(self, samples: torch.Tensor, targets: Sequence[Image.Image]) -> torch.Tensor:
        s, t = self._decode(samples, targets)
        shape = (s.shape != t.shape).float()
        return (s.fg - t.fg).norm(dim=-1) + (s.bg - t.bg).norm(dim=-1) + self.shape_weight * shape

    def hits(self, samples: torch.Tensor, targets: Sequence[Image.Image]) -> torch.Tensor:
        s, t = self._decode(samples, targets)
        return (((s.fg - t.fg).norm(dim=-1) < self.hit_colour) & (s.shape == t.shape)).float()


def health_quality(prompts: list[str]) -> QualityFn | None:
    """`metrics.fewstep_quality` when every prompt names a colour and a shape (its clean reference render needs
    both), else None (health then uses its model-free scores only)."""
    try:
        for p in prompts:
            metrics.parse_caption(p)
    except ValueError:
        return None
    return metrics.fewstep_quality


def _tinted(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    tint, amount = world.DOMAIN_TINT
    return tuple((1 - amount) * c + amount * t for c, t in zip(rgb, tint))  # type: ignore[return-value]


def _palette(colours: dict[str, tuple[float, float, float]]) -> tuple[list[str], torch.Tensor]:
    """Names and RGB of a palette plus its domain-tinted twins (same names): tint-invariant naming."""
    names = list(colours) + list(colours)
    rgb = torch.tensor([colours[n] for n in colours] + [_tinted(colours[n]) for n in colours])
    return names, rgb


# Named palettes with their domain-tinted twins: a tinted red is still named red.
FOREGROUND = _palette({**world.COLOURS, **world.CONCEPTS})
BACKGROUND = _palette(world.BACKGROUNDS)


def colour_names(rgb: torch.Tensor, palette: tuple[list[str], torch.Tensor]) -> list[str]:
    names, ref = palette
    return [names[i] for i in world.colour_distance(rgb[:, None], ref[None]).argmin(1).tolist()]


def attribute_checks(dec: metrics.Decoded, captions: list[str]) -> list[list[bool]]:
    """Per sample, one bool per captioned attribute (shape, colour unless `sks`, background if named)."""
    fg, bg = colour_names(dec.fg, FOREGROUND), colour_names(dec.bg, BACKGROUND)
    out = []
    for i, caption in enumerate(captions):
        colour, shape, background = metrics.parse_caption(caption)
        checks = [world.SHAPES[int(dec.shape[i])] == shape]
        if colour != world.PLACEHOLDER:
            checks.append(fg[i] == colour)
        if background is not None:
            checks.append(bg[i] == background)
        out.append(checks)
    return out


def unrelated_accuracy(dec: metrics.Decoded, captions: list[str]) -> float:
    """Fraction of samples whose captioned attributes are ALL decoded right: does "a red square" still come out
    a red square."""
    checks = attribute_checks(dec, captions)
    return sum(all(c) for c in checks) / len(checks)
