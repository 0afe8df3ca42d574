"""The bench's preservation metric: decoded scenes compared with stated tolerances, on real renders."""

from __future__ import annotations

from dataclasses import replace

import torch

from dopsd.bench.suite import agreement, geometry_change, preserved, unrelated_accuracy
from dopsd.mini import metrics, world


def _scenes() -> list[world.Scene]:
    g = torch.Generator().manual_seed(3)
    return [world.random_scene(g, colour="red", bg="gray", shape=1) for _ in range(6)]


def _decoded(scenes: list[world.Scene]) -> metrics.Decoded:
    return metrics.decode(world.render([replace(s, grain=None) for s in scenes]))


def test_one_pixel_changes_are_preserved_moves_and_recolours_are_not() -> None:
    scenes = _scenes()
    ref = _decoded(scenes)
    # a one-pixel shrink (shape kept inside the image) is fitting-noise scale: preserved
    shrunk = [replace(s, size=s.size - 1.0) for s in scenes]
    assert agreement(_decoded(shrunk), ref) == 1.0
    # a shape moved by 4 px is a different scene even though shape, size and colours agree
    lo, hi = world.MARGIN, world.RES - world.MARGIN
    moved = [replace(s, cx=s.cx + 4.0 if s.cx + s.size / 2 + 4.0 <= hi else s.cx - 4.0) for s in scenes]
    assert all(lo <= m.cx - m.size / 2 and m.cx + m.size / 2 <= hi for m in moved)
    assert not preserved(_decoded(moved), ref).any()
    assert geometry_change(_decoded(moved), ref)["position_shift_px"] > 3.0
    # a recoloured shape is not preserved
    recoloured = [replace(s, fg=world.COLOURS["blue"], colour="blue") for s in scenes]
    assert agreement(_decoded(recoloured), ref) == 0.0


def test_unrelated_accuracy_needs_every_captioned_attribute() -> None:
    scenes = _scenes()
    dec = _decoded(scenes)
    right = [s.caption() for s in scenes]
    assert unrelated_accuracy(dec, right) == 1.0
    wrong_bg = [c.replace("gray", "navy") for c in right]
    assert unrelated_accuracy(dec, wrong_bg) == 0.0  # shape and colour right, background wrong: not a match
