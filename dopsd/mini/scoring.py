"""The miniature's answers to the core's optional scoring hooks, from the renderer's ground truth
(dopsd.mini.metrics): `dopsd probe`'s attribute scorer and few-step health's decoder-based quality."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from dopsd.data.images import to_tensor
from dopsd.mini import metrics
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
