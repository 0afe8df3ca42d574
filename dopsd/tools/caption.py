"""Captions for a dataset folder's images that have none, written by a local Qwen3-VL (the VLM the teacher reads).

Each image without a same-name .txt (the layout training reads, `dopsd.data.scan`) gets one caption, written
beside it atomically; an existing caption is replaced only with `overwrite`. The captions are plain files: read
and edit them before training. Everything the run needs is checked before the model loads: the folder, its
images (read as training reads them) and the VLM folder. Decoding is greedy, so the same run writes the same
captions. The inputs are built by hand (`QwenVLPrompt`), so no torchvision is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from dopsd.config.schema import DataConfig
from dopsd.data.checks import names
from dopsd.data.dataset import apply_trigger
from dopsd.data.image_files import EXTENSIONS, ImageRefused, read_rgb
from dopsd.data.scan import METADATA, caption_file, folder_images
from dopsd.errors import DopsdError
from dopsd.files import atomic_write_text
from dopsd.models.local import load_part
from dopsd.models.qwen_vl import IMAGE_PAD, VISION_END, VISION_START, QwenVLPrompt, check_vlm_folder

DEFAULT_PROMPT = (
    "Describe this image in one sentence as a caption for training a text-to-image model: the main subject, "
    "its appearance, the setting, the lighting and the style. Answer with the caption only."
)
DEFAULT_MAX_NEW_TOKENS = 96
DEFAULT_IMAGE_TOKENS = 1024  # about a megapixel: enough detail to describe, bounded memory for large photos
FIELD = "--vlm"


class CaptionInputError(DopsdError):
    """The folder or a flag of `dopsd caption` cannot be used (the message names it and the fix)."""


@dataclass
class CaptionPlan:
    """What a run will do, decided before any model loads."""

    folder: Path
    vlm: Path
    todo: list[tuple[Path, Path]]  # (image, caption file to write)
    kept: list[Path]  # caption files left as they are


@dataclass
class CaptionResult:
    written: dict[str, str] = field(default_factory=dict)  # caption file name -> caption
    kept: list[str] = field(default_factory=list)  # caption files left as they are
    empty: list[str] = field(default_factory=list)  # images whose generated caption was empty (nothing written)
    cut: list[str] = field(default_factory=list)  # captions that stopped at max_new_tokens, not at their end


def plan_captions(folder: str | Path, vlm: str | Path | None, overwrite: bool = False) -> CaptionPlan:
    """Check the folder, its images and the VLM folder; say which caption files will be written."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise CaptionInputError(f"{root} {what}; give the dataset folder that holds the images to caption")
    if (root / METADATA).is_file():
        raise CaptionInputError(
            f"{root} has a {METADATA}, so training reads its captions from there, not from .txt files; write the "
            f"missing captions into {root / METADATA}, or move it away to caption with .txt files"
        )
    images, texts = folder_images(root)
    if not images:
        raise CaptionInputError(
            f"{root} holds no images to caption ({' '.join(EXTENSIONS)}, in the folder itself, not in subfolders); "
            "give the folder that holds them"
        )
    by_stem: dict[str, list[str]] = {}
    for image in images:
        by_stem.setdefault(image.stem.lower(), []).append(image.name)
    shared = [", ".join(group) for group in by_stem.values() if len(group) > 1]
    if shared:
        raise CaptionInputError(
            f"in {root}, images share one caption file name ({'; '.join(shared)}); rename all but one of each"
        )
    todo, kept = [], []
    for image in images:
        txt = caption_file(image, texts)
        if txt.exists() and not overwrite:
            kept.append(txt)
        else:
            todo.append((image, txt))
    unreadable = []
    for image, _ in todo:
        try:
            read_rgb(image)
        except ImageRefused as err:
            unreadable.append(f"{image.name}: {err}")
    if unreadable:
        raise CaptionInputError(
            f"{len(unreadable)} image(s) in {root} cannot be read; fix or remove them:\n  " + "\n  ".join(unreadable)
        )
    return CaptionPlan(root, check_vlm_folder(vlm, FIELD), todo, kept)


def check_trigger_word(word: str | None) -> str | None:
    if word is not None and not word.strip():
        raise CaptionInputError(
            f"--trigger-word is blank ({word!r}); give the word that names the concept, or leave it out"
        )
    return word


class Captioner:
    """A Qwen3-VL that answers one prompt about one image at a time, greedily."""

    def __init__(self, vlm: Path, device: torch.device, dtype: torch.dtype, image_tokens: int = DEFAULT_IMAGE_TOKENS):
        from transformers import Qwen3VLForConditionalGeneration

        self.prompt = QwenVLPrompt(vlm, FIELD, image_tokens)
        model = load_part(Qwen3VLForConditionalGeneration, vlm, None, dtype, quiet=True)
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        tok = self.prompt.tokenizer
        vocab = int(self.model.config.get_text_config().vocab_size)
        # Embedding rows past the tokenizer decode to nothing, and the prompt's own markers are no caption.
        markers = [self.prompt.ids[t] for t in (IMAGE_PAD, VISION_START, VISION_END, "<|im_start|>")]
        self.suppress = sorted(set(range(len(tok), vocab)) | set(markers))
        self.stop = [self.prompt.ids["<|im_end|>"]] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        self.was_cut = False  # the last answer stopped at max_new_tokens

    @torch.no_grad()
    def __call__(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
        from transformers import GenerationConfig

        kwargs, length = self.prompt.inputs(image, prompt, self.device, self.dtype)
        tok = self.prompt.tokenizer
        config = GenerationConfig(  # not the folder's generation_config.json: its sampling would make runs differ
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=sorted(set(self.stop)),
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else self.stop[0],
            suppress_tokens=self.suppress,
        )
        answer = self.model.generate(**kwargs, generation_config=config)[0, length:]
        self.was_cut = len(answer) >= max_new_tokens and int(answer[-1]) not in self.stop
        text = tok.decode(answer, skip_special_tokens=True)
        return " ".join(text.split())  # one line: each line of a caption file is a separate caption


def write_captions(
    plan: CaptionPlan,
    captioner: Callable[[Image.Image, str, int], str],
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    trigger_word: str | None = None,
    progress: Callable[[str, str], None] | None = None,
) -> CaptionResult:
    """Caption each image of the plan and write it beside the image; `progress(caption file, caption)` after each."""
    trigger = DataConfig(trigger_word=trigger_word)
    result = CaptionResult(kept=[p.name for p in plan.kept])
    for image, txt in plan.todo:
        text = captioner(read_rgb(image)[0], prompt, max_new_tokens)
        if not text:
            result.empty.append(image.name)
            continue
        text = apply_trigger(text, trigger)  # the word is prepended unless the caption has it already
        atomic_write_text(txt, text + "\n")
        result.written[txt.name] = text
        if getattr(captioner, "was_cut", False):
            result.cut.append(txt.name)
        if progress is not None:
            progress(txt.name, text)
    return result


def caption_folder(
    plan: CaptionPlan,
    device: torch.device,
    dtype: torch.dtype,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    trigger_word: str | None = None,
    image_tokens: int = DEFAULT_IMAGE_TOKENS,
    progress: Callable[[str, str], None] | None = None,
) -> CaptionResult:
    """The captions of a checked plan (`plan_captions`); the VLM loads only if an image needs one."""
    check_trigger_word(trigger_word)
    if not plan.todo:
        return CaptionResult(kept=[p.name for p in plan.kept])
    captioner = Captioner(plan.vlm, device, dtype, image_tokens)
    return write_captions(plan, captioner, prompt, max_new_tokens, trigger_word, progress)


def summary(result: CaptionResult, folder: str | Path) -> str:
    """What a run did, in one or two lines."""
    line = f"{folder}: wrote {len(result.written)} caption(s), kept {len(result.kept)} existing"
    if result.kept and not result.written and not result.empty:
        line += " (every image has a caption; --overwrite replaces them)"
    if result.empty:
        line += (
            f"\n{len(result.empty)} image(s) got an empty caption and still have none ({names(result.empty)}); "
            "write those by hand or run again with another --prompt"
        )
    if result.cut:
        line += (
            f"\n{len(result.cut)} caption(s) stopped at --max-new-tokens before their end ({names(result.cut)}); "
            "finish them by hand, or delete them and run again with a larger --max-new-tokens"
        )
    return line
