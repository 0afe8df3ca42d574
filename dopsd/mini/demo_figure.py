"""The picture `dopsd demo` writes (OUT/demo.png): before | SFT | D-OPSD at the turbo's 4 steps, same noise, made
for a person to read.

  * top: every row is one prompt (its text on the left: concept prompts with the placeholder word, then unrelated
    named-colour prompts), every column one model with its measured numbers; each sample beside its fine detail
    (`dopsd.data.images.high_pass`: the sample minus its blurred self, amplified; grey = no detail). The miniature's
    world carries a per-pixel film grain; a model that lost its few-step sharpness (SFT) returns it as a smooth
    surface, so its detail cells are nearly flat grey where the others are speckled;
  * bottom: the first concept prompt and the first unrelated prompt, each model's sample cropped to a quarter
    (the window with the most detail in the untouched turbo's sample) and magnified, with its detail beside it
    and the sample's mean |detail|. SFT's loss is plainest on the concept it was trained on (in the demo's run
    its samples of the grid's 4 concept prompts keep 60–79% of the untouched turbo's mean |detail|, D-OPSD's
    81–93%); on unrelated prompts, which prior preservation holds in place, it is smaller (82–90%, D-OPSD 100%),
    and that is what `fewstep_quality` measures on 64 of them.
All enlargements are nearest-neighbour: every pixel of the 24×24 samples stays a visible square.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageDraw

from dopsd.data.images import font, high_pass, labelled_grid, to_pil

TITLES = {"before": "before (untouched turbo)", "sft": "SFT", "dopsd": "D-OPSD"}
CELL = 96  # pixels per 24×24 sample in the grid (×4)
ZOOM = 16  # magnification of the crops
LABEL_WIDTH = 230


def column_title(name: str, numbers: dict[str, float]) -> str:
    # ASCII only: Pillow's bundled font has no glyphs for ·, × or –
    return (
        f"{TITLES.get(name, name)}  |  detail\nconcept fidelity {numbers['concept_fidelity']:.2f}\n"
        f"few-step quality {numbers['fewstep_quality']:.3f}\nunrelated accuracy "
        f"{numbers['unrelated_accuracy']:.2f}\ndrift {numbers['drift']:.4f}"
    )


def _crop_box(image: torch.Tensor) -> tuple[int, int, int, int]:
    """The half-size window (left, top, right, bottom) with the most fine detail in `image` (3, H, W): an edge
    of the shape with grain on both sides, the place where blur shows."""
    h, w = image.shape[-2:]
    ch, cw = h // 2, w // 2
    energy = high_pass(image[None])[0].abs().sum(0)
    best, box = -1.0, (0, 0, cw, ch)
    for top in range(0, h - ch + 1, 2):
        for left in range(0, w - cw + 1, 2):
            e = float(energy[top : top + ch, left : left + cw].sum())
            if e > best:
                best, box = e, (left, top, left + cw, top + ch)
    return box


def zoom_strip(samples: dict[str, torch.Tensor], prompt: str) -> Image.Image:
    """For one prompt: per model its sample's crop and that crop's detail, magnified ZOOM× (same window for all)."""
    face = font(13)
    names = list(samples)
    box = _crop_box(samples[names[0]])
    side = (box[2] - box[0]) * ZOOM
    gap, head = 16, 40
    strip = Image.new("RGB", (len(names) * (2 * side + 4 + gap), head + side + 4), "white")
    draw = ImageDraw.Draw(strip)
    draw.text(
        (2, 2),
        f'zoom x{ZOOM} on "{prompt}" (pixels x {box[0]}-{box[2] - 1}, y {box[1]}-{box[3] - 1}): '
        "sample | its fine detail",
        fill="black",
        font=face,
    )
    for i, name in enumerate(names):
        x = i * (2 * side + 4 + gap)
        pair = (samples[name], high_pass(samples[name][None])[0])
        energy = float(pair[1].abs().mean())
        draw.text((x + 2, 20), f"{TITLES.get(name, name)}: mean |detail| {energy:.2f}", fill="black", font=face)
        for j, image in enumerate(pair):
            crop = to_pil(image[None])[0].crop(box).resize((side, side), Image.Resampling.NEAREST)
            strip.paste(crop, (x + j * (side + 4), head))
    return strip


def demo_figure(
    images: dict[str, torch.Tensor], results: dict[str, dict[str, Any]], prompts: list[str], zoom_rows: list[int]
) -> Image.Image:
    """images: {model: (N, 3, H, W)} samples of the same N prompts and noise; results: each model's numbers;
    zoom_rows: the prompts shown magnified at the bottom."""
    names = list(images)
    columns = [column_title(name, results[name]) for name in names]
    rows = []
    for r in range(len(prompts)):
        row = []
        for name in names:
            row += to_pil(torch.stack([images[name][r], high_pass(images[name][r : r + 1])[0]]))
        rows.append(row)
    grid = labelled_grid(
        rows, columns, [f'"{p}"' for p in prompts], cell=CELL, label_width=LABEL_WIDTH, font_size=12, span=2
    )
    strips = [zoom_strip({n: images[n][r] for n in names}, prompts[r]) for r in zoom_rows]
    width = max([grid.width] + [s.width for s in strips])
    figure = Image.new("RGB", (width + 8, grid.height + sum(24 + s.height for s in strips)), "white")
    figure.paste(grid, (0, 0))
    y = grid.height
    for strip in strips:
        figure.paste(strip, (4, y + 24))
        y += 24 + strip.height
    return figure
