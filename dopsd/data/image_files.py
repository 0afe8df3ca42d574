"""Training images from files: one reader, used by the dataset check and by training alike.

Every file becomes an 8-bit sRGB image, upright, or is refused with a reason a user can act on — the check
runs the very conversion training runs, so an image that passes the check cannot fail or change later.
What the conversion does, by Pillow mode:
  * 1, L, P, RGB, RGBX, YCbCr, HSV, LAB, CMYK: Pillow's own conversion to RGB (exact for all but CMYK
    without a colour profile, which uses the simple formula; the dataset check says so);
  * LA, PA, RGBA, RGBa and images with a transparency key: transparent pixels are flattened onto white
    (`TRANSPARENT_BACKGROUND`), the background most cut-out product and character images are meant for;
  * I;16, I;16B, I;16L, I;16N (16-bit): 0..65535 scaled to 0..255 — Pillow's own conversion would clip
    everything above 255 and turn a 16-bit photo solid white;
  * I (32-bit integer): read as 8-bit when every value is ≤ 255, as 16-bit when every value is ≤ 65535
    (how Pillow hands out 16-bit PGM and signed-16-bit TIFF), refused otherwise (no known white level);
  * F (32-bit float): 0..1 when every value is within it (the float convention of image tools), 0..255
    when within that (Pillow's own float convention), refused otherwise;
  * any other mode (La, BGR;15, …) is refused by name.
An embedded colour profile other than sRGB (Display P3, Adobe RGB, a CMYK press profile) is converted to
sRGB. The EXIF orientation tag is applied, as viewers do. Animated or multi-page files are refused (which
frame was meant is not ours to guess) — except MPO, the JPEG variant phones and cameras write, whose first
frame is the photo itself — and so are images over Pillow's decompression-bomb limit.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")
TRANSPARENT_BACKGROUND = (255, 255, 255)
PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "YCbCr", "HSV", "LAB", "CMYK")
ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
FIX = "save it as 8-bit RGB (PNG or JPEG)"


class ImageRefused(Exception):
    """This file cannot be used as a training image; the message says why and what to do."""


@dataclass
class ImageFacts:
    """What reading a file did, for the dataset check's summary."""

    size: tuple[int, int]  # (width, height) as shown: after the EXIF orientation
    format: str  # Pillow's format name: PNG, JPEG, …
    mode: str  # the file's Pillow mode
    rotated: bool = False  # the EXIF orientation tag turned or flipped it
    transparent: bool = False  # it had transparent pixels, now flattened onto white
    depth: str | None = None  # how a high-bit-depth mode was read, e.g. "16-bit, 0..65535 → 0..255"
    profile: str | None = None  # a non-sRGB colour profile converted to sRGB (its description)
    naive_cmyk: bool = False  # CMYK without a colour profile: the simple conversion


def _open_checked(path: Path) -> Image.Image:
    """Image.open with the size guard as an error, named in words a user can act on."""
    if path.stat().st_size == 0:
        raise ImageRefused("the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(found.group(1)) / 1e6:.0f} Mpixel, " if found else ""
        raise ImageRefused(
            f"{pixels}more than Pillow's limit of {Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpixel for one image (its guard "
            "against decompression bombs); downscale it (training needs far fewer pixels) and save it again"
        ) from None


def _sixteen_bit(values: np.ndarray, white: float, what: str) -> tuple[Image.Image, str]:
    scaled = np.clip(np.rint(values.astype(np.float64) * (255.0 / white)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, "L"), what


def _high_depth(img: Image.Image) -> tuple[Image.Image, str]:
    """An 8-bit L image from a 16/32-bit integer or float one, scaled from its white level."""
    values = np.asarray(img)
    if img.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit(values, 65535, "16-bit, 0..65535 read as 0..255")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "I" and lo >= 0 and hi <= 255:
        return _sixteen_bit(values, 255, "32-bit integer holding 0..255, read as 8-bit")
    if img.mode == "I" and lo >= 0 and hi <= 65535:
        return _sixteen_bit(values, 65535, "32-bit integer holding 0..65535, read as 16-bit")
    if img.mode == "F" and np.isfinite(values).all() and lo >= 0 and hi <= 1:
        return _sixteen_bit(values, 1.0, "float, 0..1 read as 0..255")
    if img.mode == "F" and np.isfinite(values).all() and lo >= 0 and hi <= 255:
        return _sixteen_bit(values, 255.0, "float holding 0..255, read as 8-bit")
    kind = "32-bit integer" if img.mode == "I" else "float"
    raise ImageRefused(f"mode {img.mode!r} ({kind} pixels from {lo:g} to {hi:g}) has no known white level; {FIX}")


def _to_srgb(img: Image.Image, facts: ImageFacts) -> Image.Image:
    """Apply an embedded non-sRGB colour profile (RGB, RGBA, CMYK, L); others are taken as sRGB. A profile
    that cannot be applied (damaged, or for another colour space) is ignored, and the notes say so: the
    pixels themselves are fine."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK", "L"):
        if img.mode == "CMYK":
            facts.naive_cmyk = True
        return img
    name = "embedded profile"
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        name = ImageCms.getProfileDescription(source).strip() or name
        if "srgb" in name.lower().replace(" ", ""):
            return img  # already what training assumes
        out = ImageCms.profileToProfile(
            img, source, ImageCms.createProfile("sRGB"), outputMode="RGBA" if img.mode == "RGBA" else "RGB"
        )
    except (OSError, ImageCms.PyCMSError, ValueError) as err:
        facts.profile = f"{name} cannot be applied ({err}): read as sRGB"
        facts.naive_cmyk = img.mode == "CMYK"
        return img
    facts.profile = f"{name} → sRGB"
    return out


def to_rgb(img: Image.Image, facts: ImageFacts | None = None) -> Image.Image:
    """8-bit RGB from an image of any mode (see the module docstring), or ImageRefused naming the mode."""
    facts = facts if facts is not None else ImageFacts(img.size, str(img.format), img.mode)
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        img, facts.depth = _high_depth(img)
        return img.convert("RGB")
    if mode not in PLAIN_MODES + ALPHA_MODES:
        raise ImageRefused(f"mode {mode!r} is not supported; {FIX}")
    img = _to_srgb(img, facts)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            facts.transparent = True
            background = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return rgba.convert("RGB")
    return img.convert("RGB")


def read_rgb(path: Path) -> tuple[Image.Image, ImageFacts]:
    """The file as an upright 8-bit sRGB image and what reading it did; ImageRefused if it cannot be used."""
    path = Path(path)
    try:
        with _open_checked(path) as img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format != "MPO":  # an MPO's first frame is the photo (then previews, depth maps)
                what = "pages" if img.format in ("TIFF", "MPO") else "frames"
                raise ImageRefused(
                    f"{img.format} with {frames} {what}: dopsd trains on still images; save the one you mean as PNG"
                )
            facts = ImageFacts(img.size, str(img.format), img.mode)
            img.load()  # full decode: truncated files fail here, not in the middle of training
            orientation = img.getexif().get(0x0112, 1)
            upright = ImageOps.exif_transpose(img)
            facts.rotated = orientation in (2, 3, 4, 5, 6, 7, 8)
            rgb = to_rgb(upright, facts)
    except ImageRefused:
        raise
    except Exception as err:  # noqa: BLE001 - every decoder error is a bad file
        raise ImageRefused(f"cannot read image ({type(err).__name__}: {err})") from None
    facts.size = rgb.size
    return rgb, facts


def inspect_image(path: Path) -> ImageFacts:
    """Read the file exactly as training will and return what that did (ImageRefused if it cannot be used)."""
    return read_rgb(path)[1]


def fit_image(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scaled to cover (h, w) and centre-cropped to it."""
    h, w = size
    return ImageOps.fit(img, (w, h), method=Image.Resampling.LANCZOS)


def load_image(path: Path, size: tuple[int, int]) -> Image.Image:
    """The training image: upright 8-bit sRGB, scaled to cover (h, w) and centre-cropped to it."""
    return fit_image(read_rgb(path)[0], size)


def fit_plan(size: tuple[int, int], target: tuple[int, int]) -> tuple[float, float]:
    """(scale per side, fraction of the picture cut off) when `fit_image` brings a (w, h) image to (h, w)."""
    (w, h), (th, tw) = size, target
    if w / h > tw / th:  # wider than the target: the sides go
        return th / h, 1 - (h * tw / th) / w
    return tw / w, 1 - (w * th / tw) / h


def detail_lost(height: int, width: int, factor: int, seed: int = 0) -> float:
    """Share of the variance of a per-pixel texture at (height, width) that `fit_image` loses when it brings a
    `factor`× larger copy of it (every pixel a factor×factor block) back to (height, width)."""
    rng = np.random.default_rng(seed)
    texture = rng.normal(0.0, 20.0, (height, width))
    base = np.full((height, width), 128.0)

    def round_trip(values: np.ndarray) -> np.ndarray:
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
        big = img.resize((width * factor, height * factor), Image.Resampling.NEAREST)
        return np.asarray(fit_image(big, (height, width)), dtype=np.float64)

    kept = round_trip(base + texture) - round_trip(base)
    original = np.clip(np.rint(base + texture), 0, 255) - base
    return float(1 - (kept**2).sum() / (original**2).sum())
