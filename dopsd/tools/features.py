"""Image features and text–image scores from local checkpoints, for evaluation and probes.

  * `load_image_features(folder)`: any DINOv2 / DINOv3 / CLIP / SigLIP checkpoint transformers loads from a
    local folder (CLS/pooled embedding, L2-normalised); `None` gives `PixelFeatures`, a plain fallback
    (a small blurred thumbnail, mean-removed and normalised) so metrics still run with no feature model.
  * `load_text_image_scorer(folder)`: CLIP / SigLIP cosine similarity between a caption and an image (CLIP-S).
The image features themselves live in dopsd.models.image_features (training's done signal uses them too); this
module re-exports them. Preprocessing is done there with PIL from the folder's preprocessor_config.json (resize
shortest edge, centre crop, rescale, normalise), so nothing needs torchvision.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dopsd.models.image_features import (  # the image features live below the tools (training uses them too)
    IMAGE_MODELS,
    TEXT_MODELS,
    HFImageFeatures,
    ImageFeatures,
    PixelFeatures,
    _normalise,
    _pooled,
    check_feature_folder,
    cosine_distance,
    load_image_features,
)
from dopsd.models.local import load_part, read_json


class TextImageScorer:
    """CLIP-S: cosine similarity of caption and image embeddings of a local CLIP or SigLIP checkpoint."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", field: str = "--clip-model"):
        from transformers import AutoTokenizer

        check_feature_folder(folder, field, text=True)
        self.images = HFImageFeatures(folder, device, field)
        self.tokenizer = load_part(AutoTokenizer, self.images.folder, None)
        config = read_json(self.images.folder / "config.json")
        self.max_length = int(config.get("text_config", {}).get("max_position_embeddings", 77))
        self.name = self.images.name

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        # SigLIP was trained on max-length padded text; CLIP pools at the EOS token, so padding is harmless.
        enc = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        enc = {k: v.to(self.images.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if self.images.kind != "clip":
            enc.pop("attention_mask", None)
        return _normalise(_pooled(self.images.model.get_text_features(**enc))).cpu()

    def __call__(self, captions: list[str], images: list[Image.Image]) -> torch.Tensor:
        """(B,) cosine similarity of each caption with its image."""
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images")
        return (self.text_features(captions) * self.images(images)).sum(-1)


__all__ = [
    "IMAGE_MODELS",
    "TEXT_MODELS",
    "HFImageFeatures",
    "ImageFeatures",
    "PixelFeatures",
    "TextImageScorer",
    "check_feature_folder",
    "cosine_distance",
    "load_image_features",
]
