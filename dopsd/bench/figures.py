"""The bench report's pictures: labelled image grids of samples and the metric curves over training steps (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dopsd.bench.results import FIELD_DOCS


def image_grid(rows: list[torch.Tensor], scale: int = 3, pad: int = 2, labels: list[str] | None = None) -> "Any":
    """A PIL image: one row per tensor (N, 3, H, W) in [-1, 1], nearest-neighbour upscaled by `scale`, with an
    optional text label left of each row."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("image_grid needs at least one row")
    h, w = rows[0].shape[-2:]
    cols = max(int(r.shape[0]) for r in rows)
    canvas = torch.ones(3, len(rows) * (h + pad) + pad, cols * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, y : y + h, x : x + w] = (img.float().clamp(-1, 1) + 1) / 2
    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if not labels:
        return image
    margin = 8 + 7 * max(len(t) for t in labels)  # the default bitmap font is ~6–7 px per character
    framed = Image.new("RGB", (image.width + margin, image.height), "white")
    framed.paste(image, (margin, 0))
    draw = ImageDraw.Draw(framed)
    for i, text in enumerate(labels):
        draw.text((4, (pad + i * (h + pad) + h // 2) * scale - 6), text, fill="black")
    return framed


def plot_curves(curves: dict[str, Any], path: Path, title: str) -> Path:
    """curves = {"steps": [...], "metrics": {metric: {method: [[per-step values] per seed]}}}: mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = curves["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    steps = curves["steps"]
    for ax, (metric, per_method) in zip(axes[0], metrics.items()):
        for method, runs in per_method.items():
            values = torch.tensor(runs, dtype=torch.float64)  # (seeds, points)
            mean = values.mean(0)
            std = values.std(0, unbiased=False)
            ax.plot(steps, mean.tolist(), marker="o", markersize=3, label=f"{method} (n={values.shape[0]})")
            ax.fill_between(steps, (mean - std).tolist(), (mean + std).tolist(), alpha=0.2)
        arrow = FIELD_DOCS.get(metric, ("", "higher"))[1]
        ax.set_title(f"{metric} ({arrow} = better)", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["image_grid", "plot_curves"]
