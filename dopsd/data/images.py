"""The one image-conversion module: tensors (B, 3, H, W) in [-1, 1] ↔ PIL images, and grids to look at."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

VIEWABLE = 128  # pixels: grids of smaller images are magnified to at least this cell size


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL images."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def to_tensor(images: Sequence[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL images → (B, 3, H, W) in [-1, 1]; resized (bicubic) to size=(h, w) when given."""
    out = []
    for img in images:
        img = img.convert("RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def magnify(image: Image.Image, side: int = VIEWABLE, cell: int | None = None) -> Image.Image:
    """Pixel-exact (nearest) integer enlargement of a small image or grid so it can be seen: by side // `cell`
    (the size of one image in it; default its own longer side); unchanged when that is already ≥ `side`."""
    cell = cell or max(image.size)
    if cell >= side:
        return image
    scale = max(1, side // cell)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def grid_image(images: torch.Tensor, rows: int, cols: int, pad: int = 2) -> Image.Image:
    """A rows×cols grid of images (B, 3, H, W) in [-1, 1], row-major, magnified when the images are tiny."""
    if len(images) != rows * cols:
        raise ValueError(f"grid of {rows}×{cols} needs {rows * cols} images, got {len(images)}")
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    h, w = arr.shape[1:3]
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return magnify(Image.fromarray(canvas), cell=max(h, w))


def font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size` pixels (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def wrap(text: str, width: int, face: ImageFont.ImageFont) -> list[str]:
    """`text` broken into lines (at spaces, and at explicit newlines) no wider than `width` pixels in `face`."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if line and face.getlength(trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def high_pass(pixels: torch.Tensor, gain: float = 3.0) -> torch.Tensor:
    """The fine detail of images (B, 3, H, W) in [-1, 1], as grey images: the luminance minus its 3×3 box-blurred
    self, times `gain`, in [-1, 1] with 0 (mid-grey) = no detail. Film grain and edges show as light and dark
    specks; flat or blurred areas are plain grey."""
    luma = pixels.float().mean(1, keepdim=True)
    blurred = F.avg_pool2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return ((luma - blurred) * gain).clamp(-1, 1).expand(-1, 3, -1, -1)


def labelled_grid(
    rows: Sequence[Sequence[Image.Image]],
    columns: Sequence[str] = (),
    labels: Sequence[str] = (),
    cell: int = 96,
    pad: int = 2,
    label_width: int = 90,
    font_size: int = 11,
    span: int = 1,
) -> Image.Image:
    """A grid of PIL images (one list per row, each image scaled to cell×cell: nearest when enlarged), with
    column titles above (a title may hold several lines, and long ones wrap; each title spans `span` columns) and
    row labels on the left, wrapped to `label_width` (either may be empty)."""
    face = font(font_size)
    line = font_size + 3
    titles = [wrap(t, span * (cell + pad) - 6, face) for t in columns]
    head = line * max((len(t) for t in titles), default=0) + (4 if columns else 0)
    left = label_width if labels else 0
    ncol = max((len(r) for r in rows), default=len(columns) * span)
    grid = Image.new("RGB", (left + ncol * (cell + pad), head + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(titles):
        for i, text in enumerate(title):
            draw.text((left + c * span * (cell + pad) + 2, 2 + i * line), text, fill="black", font=face)
    for r, row in enumerate(rows):
        y = head + r * (cell + pad)
        if r < len(labels):
            text = wrap(labels[r], label_width - 6, face)
            top = y + max(0, (cell - line * len(text)) // 2)
            for i, part in enumerate(text):
                draw.text((2, top + i * line), part, fill="black", font=face)
        for c, img in enumerate(row):
            scale = Image.NEAREST if max(img.size) < cell else Image.BICUBIC
            grid.paste(img.convert("RGB").resize((cell, cell), scale), (left + c * (cell + pad), y))
    return grid
