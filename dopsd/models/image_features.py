"""Image features from local checkpoints, below the tools so that training can use them too (the done signal,
dopsd.training.done) as well as `dopsd eval` and `dopsd probe` (dopsd.tools.features re-exports these names).

  * `load_image_features(folder)`: any DINOv2 / DINOv3 / CLIP / SigLIP checkpoint transformers loads from a
    local folder (CLS/pooled embedding, L2-normalised); `None` gives `PixelFeatures`, a plain fallback
    (a small blurred thumbnail, mean-removed and normalised) so metrics still run with no feature model.
Preprocessing is done here with PIL from the folder's preprocessor_config.json (resize shortest edge,
centre crop, rescale, normalise), so nothing needs torchvision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from dopsd.models.local import ModelFolderError, check_model_folder, load_part, read_json

IMAGE_MODELS = {
    "dinov2",
    "dinov2_with_registers",
    "dinov3_vit",
    "clip",
    "clip_vision_model",
    "siglip",
    "siglip2",
    "siglip_vision_model",
}
TEXT_MODELS = {"clip", "siglip", "siglip2"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class ImageFeatures(Protocol):
    name: str

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, D) L2-normalised features."""
        ...


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class PixelFeatures:
    """Fallback without a feature model: a 16×16 blurred thumbnail, mean-removed, L2-normalised."""

    name = "pixels"

    def __init__(self, side: int = 16):
        self.side = side

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        arrs = [
            np.asarray(im.convert("RGB").resize((self.side, self.side), Image.Resampling.BOX), dtype=np.float32)
            for im in images
        ]
        x = torch.from_numpy(np.stack(arrs)).reshape(len(images), -1) / 255.0
        return _normalise(x - x.mean(dim=1, keepdim=True))


class _Preprocess:
    """CLIP/DINO-style preprocessing from a preprocessor_config.json (or the model's image size)."""

    def __init__(self, folder: Path, image_size: int):
        cfg = read_json(folder / "preprocessor_config.json") if (folder / "preprocessor_config.json").is_file() else {}
        size = cfg.get("size", {"shortest_edge": image_size})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        self.resize = size.get("shortest_edge") or (size.get("height"), size.get("width"))
        crop = cfg.get("crop_size", image_size)
        crop = crop if isinstance(crop, dict) else {"height": crop, "width": crop}
        self.crop = (
            (crop.get("height", image_size), crop.get("width", image_size)) if cfg.get("do_center_crop", True) else None
        )
        self.scale = float(cfg.get("rescale_factor", 1 / 255))
        self.mean = torch.tensor(cfg.get("image_mean", IMAGENET_MEAN)).view(3, 1, 1)
        self.std = torch.tensor(cfg.get("image_std", IMAGENET_STD)).view(3, 1, 1)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for im in images:
            im = im.convert("RGB")
            if isinstance(self.resize, int):
                w, h = im.size
                s = self.resize / min(w, h)
                im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
            else:
                im = im.resize((self.resize[1], self.resize[0]), Image.Resampling.BICUBIC)
            if self.crop is not None:
                ch, cw = self.crop
                w, h = im.size
                left, top = (w - cw) // 2, (h - ch) // 2
                im = im.crop((left, top, left + cw, top + ch))
            x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) * self.scale
            out.append((x - self.mean) / self.std)
        return torch.stack(out)


def _pooled(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    return out.last_hidden_state[:, 0]  # CLS token


def check_feature_folder(folder: str | Path | None, field: str, text: bool = False) -> tuple[Path, str]:
    """(folder, model_type) of a local image-feature model (with a text tower if `text`), checked without
    loading it, so a wrong folder is refused before anything else loads."""
    what = "CLIP/SigLIP model" if text else "image-feature model (DINOv2/DINOv3/CLIP/SigLIP)"
    path = check_model_folder(folder, field, what)
    try:
        kind = read_json(path / "config.json").get("model_type")
    except ValueError as err:
        raise ModelFolderError(f"{field}: {path / 'config.json'} is not valid JSON ({err})") from None
    if kind not in IMAGE_MODELS:
        raise ModelFolderError(f"{field}: {path} holds a {kind!r} model; use one of {sorted(IMAGE_MODELS)}")
    if text and kind not in TEXT_MODELS:
        raise ModelFolderError(f"{field}: {path} ({kind}) has no text tower; use CLIP or SigLIP")
    return path, kind


class HFImageFeatures:
    """Image embedding of a local DINOv2/DINOv3/CLIP/SigLIP checkpoint."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", field: str = "--feature-model"):
        from transformers import AutoModel

        self.folder, self.kind = check_feature_folder(folder, field)
        config = read_json(self.folder / "config.json")
        self.name = f"{self.kind}:{self.folder.name}"
        self.device = torch.device(device)
        self.model = load_part(AutoModel, self.folder, None).to(self.device).eval()
        vision = config.get("vision_config", config)
        self.preprocess = _Preprocess(self.folder, int(vision.get("image_size", 224)))

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.device)
        if hasattr(self.model, "get_image_features"):
            return _normalise(_pooled(self.model.get_image_features(pixel_values=pixels))).cpu()
        return _normalise(_pooled(self.model(pixel_values=pixels))).cpu()


def load_image_features(folder: str | Path | None, device: str | torch.device = "cpu") -> ImageFeatures:
    """The feature model in `folder`, or the pixel fallback when `folder` is None."""
    return PixelFeatures() if folder is None else HFImageFeatures(folder, device)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Na, Nb) matrix of 1 − cos between L2-normalised feature rows."""
    return 1 - _normalise(a) @ _normalise(b).T
