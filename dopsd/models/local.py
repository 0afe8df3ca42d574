"""Local diffusers-layout folders: check them, load their parts offline, and shared image helpers.

Nothing here reaches a model hub: every `from_pretrained` gets `local_files_only=True`, and a folder that
is missing or incomplete is refused up front with an error naming the missing piece and how to get it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dopsd.config import ConfigError
from dopsd.errors import DopsdError, WeightsFileError
from dopsd.models.base import CaptionProblem
from dopsd.models.quantize import quantize_network

# What each family's folder must hold: pipeline class names accepted in model_index.json and subfolders.
LAYOUTS: dict[str, dict[str, Any]] = {
    "zimage": {
        "pipelines": ("ZImagePipeline",),
        "parts": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
        "hint": "hf download Tongyi-MAI/Z-Image-Turbo --local-dir <folder>",
    },
    "flux2": {
        "pipelines": ("Flux2KleinPipeline", "Flux2KleinKVPipeline"),
        "parts": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
        "hint": "hf download black-forest-labs/FLUX.2-klein-4B --local-dir <folder>",
    },
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


class ModelFolderError(DopsdError, ValueError):
    """A model folder is missing, incomplete or of the wrong family."""


def _has_weights(folder: Path) -> bool:
    return any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir() if p.is_file())


def check_safetensors(path: str | Path, field: str, fix: str = "copy or download it again") -> Path:
    """The file if its safetensors header is readable and the file holds every byte the header lists.

    Reads only the header (bytes, not tensors), so whole model folders are checked before anything loads; a
    copy or download that stopped early is named here instead of failing deep inside a library.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{field}: {path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("the file is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, 100_000_000):
                raise ValueError("the header length does not fit the file")
            header = json.loads(fh.read(length))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as err:
        raise WeightsFileError(f"{field}: {path} is not a readable safetensors file ({err}); {fix}") from None
    if size < 8 + length + end:
        raise WeightsFileError(
            f"{field}: {path} is truncated ({size:,} bytes, its header lists {8 + length + end:,}); {fix}"
        )
    return path


def read_safetensors(path: str | Path, field: str, fix: str = "copy or download it again") -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` after `check_safetensors`, with any remaining read error naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path, field, fix)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise WeightsFileError(f"{field}: cannot read {path} ({err})") from None


def _check_weight_files(folder: Path, field: str) -> None:
    for file in sorted(folder.glob("*.safetensors")):
        check_safetensors(file, field)


def check_pipeline_folder(path: str | Path | None, family: str, field: str = "model.pretrained") -> Path:
    """Return the folder if it is a complete local diffusers folder of `family`; otherwise raise clearly."""
    layout = LAYOUTS[family]
    hint = f"download it first, e.g. `{layout['hint']}`, and set {field} to that folder"
    if path is None or str(path) == "":
        raise ModelFolderError(
            f"{field} is not set: it must name a local {family} folder in the diffusers layout; {hint}"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(f"{field}: {folder} does not exist or is not a folder; {hint}")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelFolderError(
            f"{field}: {folder} has no model_index.json, so it is not a diffusers pipeline folder; {hint}"
        )
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{field}: {index} is not valid JSON ({err})") from err
    cls = meta.get("_class_name")
    if cls not in layout["pipelines"]:
        raise ModelFolderError(
            f"{field}: {folder} holds a {cls!r} pipeline, but model family {family!r} needs one of "
            f"{list(layout['pipelines'])}; pick the matching model.family or folder"
        )
    missing = []
    for part in layout["parts"]:
        sub = folder / part
        if not sub.is_dir():
            missing.append(f"{part}/ (folder missing)")
        elif part == "tokenizer":
            if not any((sub / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
                missing.append("tokenizer/tokenizer.json")
        elif part == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                missing.append("scheduler/scheduler_config.json")
        else:
            if not (sub / "config.json").is_file():
                missing.append(f"{part}/config.json")
            elif not _has_weights(sub):
                missing.append(f"{part}/ weights (*.safetensors)")
    if missing:
        raise ModelFolderError(f"{field}: {folder} is incomplete; missing: {', '.join(missing)}; {hint}")
    for part in layout["parts"]:
        _check_weight_files(folder / part, field)
    return folder


def check_model_folder(path: str | Path | None, field: str, what: str) -> Path:
    """A single transformers model folder (config.json + weights), e.g. a Qwen3-VL or DINOv2 checkpoint."""
    if path is None or str(path) == "":
        raise ModelFolderError(f"{field} is not set: it must name a local {what} folder (config.json + weights)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(f"{field}: {folder} does not exist or is not a folder; download the {what} there first")
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{field}: {folder} has no config.json, so it is not a {what} folder")
    if not _has_weights(folder):
        raise ModelFolderError(f"{field}: {folder} has a config.json but no weights (*.safetensors)")
    _check_weight_files(folder, field)
    return folder


def folder_fingerprint(path: str | Path | None) -> str | None:
    """Hash of a folder's file names, sizes and mtimes: changes when its weights change (for feature caches)."""
    if path is None or not Path(path).expanduser().is_dir():
        return None
    root = Path(path).expanduser()
    stats = sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
    )
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def load_part(
    cls: Any, folder: Path, subfolder: str | None, dtype: torch.dtype | None = None, quiet: bool = False, **kwargs: Any
) -> Any:
    """`cls.from_pretrained` offline, with the error naming the folder when the files do not fit the class.

    quiet: silence transformers' load report (used where unused checkpoint keys are expected, e.g. lm_head).
    """
    from transformers.utils import logging as hf_logging

    extra: dict[str, Any] = {"local_files_only": True, **kwargs}
    if subfolder is not None:
        extra["subfolder"] = subfolder
    if dtype is not None:
        extra["torch_dtype"] = dtype
    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(str(folder), **extra)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        where = folder / subfolder if subfolder else folder
        raise ModelFolderError(f"cannot load {cls.__name__} from {where}: {err}") from err
    finally:
        hf_logging.set_verbosity(level)


def part_config(cls: Any, folder: Path, part: str) -> dict[str, Any]:
    """A model part's config.json over its class's defaults, read without building the part (the denoiser is only
    loaded once the feature cache is built, but its sizes are needed before)."""
    import inspect

    defaults = {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **read_json(Path(folder) / part / "config.json")}


def load_denoiser(
    cls: Any, folder: Path, dtype: torch.dtype, device: torch.device, quantize: str = "none", skip: tuple[str, ...] = ()
) -> Any:
    """The transformer on `device`; with model.quantize, loaded on the CPU and quantized layer by layer onto the
    device (dopsd.models.quantize), so the device never holds it at full precision. `skip`: the family's modules to keep
    unquantized."""
    if quantize == "none":
        return load_part(cls, folder, "transformer", dtype).to(device)

    network = load_part(cls, folder, "transformer", dtype)
    report = quantize_network(network, quantize, skip, device)
    print(f"[dopsd] {report}")
    return network


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- images -----------------------------------------------------------------------------------------


def to_pixels(image: Image.Image, multiple: int) -> torch.Tensor:
    """One PIL image → (1, 3, H, W) in [-1, 1] at its own size floored to `multiple` (the data loader already
    resized it to its training bucket): aspect-preserving resize + centre crop, diffusers' "crop" mode, which is
    also what the FLUX.2 pipeline applies to reference images."""
    from diffusers.image_processor import VaeImageProcessor

    w, h = image.size
    height, width = max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple)
    proc = VaeImageProcessor(vae_scale_factor=1, do_resize=True, do_normalize=True, do_convert_rgb=True)
    return proc.preprocess(image.convert("RGB"), height=height, width=width, resize_mode="crop")


def stack_or_list(latents: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One (B, …) tensor when all images share a size; per-image tensors when a call mixes buckets."""
    if len({tuple(x.shape) for x in latents}) == 1:
        return torch.cat(latents)
    return [x[0] for x in latents]


def check_size(height: int, width: int, multiple: int, family: str) -> None:
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ConfigError(
            f"{family}: image size {height}x{width} must be positive multiples of {multiple} "
            f"(VAE downsampling x 2x2 patches); set model.height/model.width accordingly"
        )


def still_loaded(part: Any, name: str) -> Any:
    """`part`, or a clear error if `release_encoders()` already freed it."""
    if part is None:
        raise RuntimeError(f"the {name} was released (release_encoders); build contexts before releasing it")
    return part


def chat_tokens(
    tokenizer: Any, captions: list[str], max_tokens: int, thinking: bool, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions as one user turn of the Qwen chat template (generation prompt appended), padded to max_tokens.
    Returns (input_ids, attention_mask) on `device`. Z-Image uses thinking=True, FLUX.2-klein thinking=False."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        for c in captions
    ]
    enc = tokenizer(texts, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def chat_token_counts(tokenizer: Any, captions: list[str], thinking: bool) -> list[int]:
    """How many tokens each caption takes in the chat template `chat_tokens` builds (before its truncation)."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        for c in captions
    ]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True).input_ids] if texts else []


CUT = "{n} tokens with the chat template; the text encoder reads the first {limit} ({field}), the rest is cut"


def token_limit_problems(counts: list[int], limit: int, field: str, message: str = CUT) -> list[Any]:
    """Notices (dopsd.models.base.CaptionProblem) for captions the text encoder will cut at `limit` tokens;
    `message` is formatted with n, limit and field."""
    return [
        CaptionProblem(i, message.format(n=n, limit=limit, field=field), notice=True)
        for i, n in enumerate(counts)
        if n > limit
    ]
