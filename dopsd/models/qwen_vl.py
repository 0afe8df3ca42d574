"""Teacher VLM encoder: Qwen3-VL whose language model carries the diffusion model's own Qwen3 text encoder.

The DiT was trained on features of its own Qwen3 text encoder. Qwen3-VL shares that language-model
architecture, so its vision tower + merger can feed image tokens into *the same* language weights: copy
every language-model tensor of the text encoder over Qwen3-VL's (names and shapes must match exactly;
anything else is refused), keep the vision tower, and read the same hidden layer the pipeline reads.
The result is a "caption" of image + text tokens that the DiT already understands.

`Qwen3VLProcessor` needs torchvision, so the inputs are built by hand: the PIL image processor gives
`pixel_values`/`image_grid_thw`, `<|image_pad|>` is repeated prod(grid)/merge² times, and
`mm_token_type_ids` marks the image tokens (transformers 5 requires it for M-RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from dopsd.models.local import ModelFolderError, check_model_folder, load_part, read_json

IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"


@dataclass
class TransplantReport:
    matched: int  # language-model tensors overwritten by the text encoder's
    total: int  # language-model tensors of the VLM
    ignored: list[str] = field(default_factory=list)  # text-encoder tensors with no VLM counterpart (lm_head)

    def __str__(self) -> str:
        return f"{self.matched}/{self.total} language-model tensors transplanted from the text encoder"


def _language_state(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Text-encoder tensors named like a bare Qwen3Model (`Qwen3ForCausalLM` keeps them under `model.`)."""
    state = text_encoder.state_dict()
    if any(k.startswith("model.") for k in state):
        state = {k[len("model.") :] if k.startswith("model.") else k: v for k, v in state.items()}
    return state


@torch.no_grad()
def transplant_language_weights(language_model: nn.Module, text_encoder: nn.Module) -> TransplantReport:
    """Overwrite `language_model`'s tensors with the text encoder's; refuse unless every one fits exactly."""
    source = _language_state(text_encoder)
    target = language_model.state_dict()
    ignored = sorted(k for k in source if k not in target and k.startswith("lm_head"))
    extra = sorted(k for k in source if k not in target and not k.startswith("lm_head"))
    missing = sorted(k for k in target if k not in source)
    wrong = [
        (k, tuple(source[k].shape), tuple(v.shape))
        for k, v in target.items()
        if k in source and source[k].shape != v.shape
    ]
    if wrong or missing or extra:
        details = []
        if wrong:
            k, s, t = wrong[0]
            details.append(f"{len(wrong)} tensors differ in shape (e.g. {k}: text encoder {s} vs VLM {t})")
        if missing:
            details.append(f"{len(missing)} VLM tensors have no text-encoder counterpart (e.g. {missing[0]})")
        if extra:
            details.append(f"{len(extra)} text-encoder tensors have no VLM counterpart (e.g. {extra[0]})")
        raise ModelFolderError(
            "model.teacher_encoder: the Qwen3-VL language model does not fit the diffusion model's text encoder: "
            + "; ".join(details)
            + ". Use the Qwen3-VL of the same size as the text encoder (Z-Image-Turbo / FLUX.2-klein-4B: "
            "Qwen3-VL-4B-Instruct)."
        )
    for k, v in target.items():
        v.copy_(source[k].to(v.dtype))
    return TransplantReport(matched=len(target), total=len(target), ignored=ignored)


def check_vlm_folder(folder: str | Path | None, field_name: str = "model.teacher_encoder") -> Path:
    """The Qwen3-VL folder the VLM teacher reads, checked without loading weights: it exists, holds a qwen3_vl
    model and its image processor's config."""
    path = check_model_folder(folder, field_name, "Qwen3-VL")
    model_type = read_json(path / "config.json").get("model_type")
    if model_type != "qwen3_vl":
        raise ModelFolderError(
            f"{field_name}: {path} holds a {model_type!r} model; the VLM teacher needs Qwen3-VL (qwen3_vl)"
        )
    if not (path / "preprocessor_config.json").is_file():
        raise ModelFolderError(f"{field_name}: {path} has no preprocessor_config.json (the Qwen3-VL image processor)")
    return path


class QwenVLPrompt:
    """The inputs of one user turn, image first, then text, built by hand (see the module's docstring): what the
    teacher encodes and what `dopsd caption` asks the VLM. The prompt ends where the assistant's answer begins."""

    def __init__(self, path: Path, field_name: str, image_tokens: int):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        self.tokenizer = load_part(AutoTokenizer, path, None)
        self.processor = load_part(Qwen2VLImageProcessorPil, path, None)
        side = self.processor.patch_size * self.processor.merge_size
        # Cap the image's token count so image + text fit the context budget.
        self.processor.size = {
            "shortest_edge": min(self.processor.size["shortest_edge"], image_tokens * side * side),
            "longest_edge": image_tokens * side * side,
        }
        self.ids = {}
        for tok in (IMAGE_PAD, VISION_START, VISION_END, "<|im_start|>", "<|im_end|>"):
            idx = self.tokenizer.convert_tokens_to_ids(tok)
            if idx is None or idx == self.tokenizer.unk_token_id:
                raise ModelFolderError(f"{field_name}: the tokenizer in {path} lacks the special token {tok}")
            self.ids[tok] = idx

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def inputs(
        self,
        image: Image.Image,
        text: str,
        device: torch.device,
        dtype: torch.dtype,
        limit: int | None = None,
        pad: bool = False,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """(keyword arguments of Qwen3-VL's forward / generate, number of real tokens).

        limit: cut the text so the whole prompt fits this many tokens; pad: pad to `limit` with the pad token
        (attention-masked)."""
        vis = self.processor(images=[image.convert("RGB")], return_tensors="pt")
        grid = vis["image_grid_thw"]
        n_image = int(grid.prod()) // self.processor.merge_size**2
        prefix = (
            self._ids("<|im_start|>user\n")
            + [self.ids[VISION_START]]
            + [self.ids[IMAGE_PAD]] * n_image
            + [self.ids[VISION_END]]
        )
        suffix = self._ids("<|im_end|>\n<|im_start|>assistant\n")
        body = self._ids(text)
        if limit is not None:
            room = limit - len(prefix) - len(suffix)
            if room < 1:
                raise ValueError(
                    f"the teacher image takes {n_image} tokens, leaving no room for the caption within {limit}; "
                    "lower model.teacher_image_tokens or raise model.teacher_max_tokens"
                )
            body = body[:room]
        ids = prefix + body + suffix
        length = len(ids)
        if pad and limit is not None:
            ids = ids + [self.tokenizer.pad_token_id] * (limit - length)
        input_ids = torch.tensor([ids], device=device)
        mask = torch.zeros_like(input_ids)
        mask[:, :length] = 1
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "pixel_values": vis["pixel_values"].to(device, dtype),
            "image_grid_thw": grid.to(device),
            "mm_token_type_ids": (input_ids == self.ids[IMAGE_PAD]).int(),
        }
        return kwargs, length


class QwenVLEncoder:
    """Multimodal features of (image, caption): image first, then the caption, one user turn."""

    def __init__(
        self,
        folder: str | Path | None,
        text_encoder: nn.Module,
        device: torch.device | str,
        dtype: torch.dtype,
        image_tokens: int = 256,
        field_name: str = "model.teacher_encoder",
    ):
        from transformers import Qwen3VLModel

        path = check_vlm_folder(folder, field_name)
        self.model = load_part(Qwen3VLModel, path, None, dtype, quiet=True).to(device).eval().requires_grad_(False)
        self.report = transplant_language_weights(self.model.language_model, text_encoder)
        self.prompt = QwenVLPrompt(path, field_name, image_tokens)
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def encode(
        self, image: Image.Image, caption: str, layers: Sequence[int], max_tokens: int = 1024, pad_to: int | None = None
    ) -> torch.Tensor:
        """(L, len(layers)·hidden) features; hidden states of `layers` concatenated per token (one layer: as is).

        pad_to: pad the sequence to this length with the pad token (attention-masked), as FLUX.2's pipeline
        does for text, and return all positions; None returns only the real tokens.
        """
        kwargs, length = self.prompt.inputs(
            image, caption, self.device, self.dtype, limit=pad_to or max_tokens, pad=pad_to is not None
        )
        out = self.model(**kwargs, output_hidden_states=True)
        feats = torch.cat([out.hidden_states[k][0] for k in layers], dim=-1)
        return feats if pad_to is not None else feats[:length]

    def release(self) -> None:
        self.model = None  # type: ignore[assignment]
