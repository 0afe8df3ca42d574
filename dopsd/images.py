"""The one image-conversion module: tensors (B, 3, H, W) in [-1, 1] ↔ PIL images, and grids to look at."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image


def grid_image(images: torch.Tensor, rows: int, cols: int, pad: int = 2) -> Image.Image:
    """A rows×cols grid of images (B, 3, H, W) in [-1, 1], row-major."""
    if len(images) != rows * cols:
        raise ValueError(f"grid of {rows}×{cols} needs {rows * cols} images, got {len(images)}")
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    h, w = arr.shape[1:3]
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    grid = Image.fromarray(canvas)
    if max(h, w) < 128:  # tiny models: upscale so the grid is viewable
        scale = max(1, 128 // max(h, w))
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL images."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def to_tensor(images: Sequence[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL images → (B, 3, H, W) in [-1, 1]; resized to size=(h, w) when given."""
    out = []
    for img in images:
        img = img.convert("RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)
