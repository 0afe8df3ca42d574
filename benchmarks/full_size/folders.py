"""Model folders in the layout users download (model_index.json, one folder per part with its config, sharded
safetensors with their index files, scheduler, tokenizer), with random weights, written with bounded memory.

The large parts (transformer, text encoder, Qwen3-VL) are built on the meta device from their configs
(dopsd/models/fullsize/, or the tiny configs of benchmarks/gpu_real_scale_tiny.py), and their weights are made
and written shard by shard (`SHARD_BYTES`): only one shard's tensors exist at a time. Each weight is uniform with
its layer's default scale (Linear / conv: ±1/√fan_in; embeddings and other tensors: std 0.02; norms: 1), cut from
one pool of random numbers (`Pool`), in bfloat16, the dtype of the published checkpoints. Tied weights (Qwen's tied LM head) are written once. The
small VAE is built whole with its own initialisation (FLUX.2's batch-norm statistics perturbed, so that the latent
normalisation matters). The tokenizer is a stand-in of the real class (full_size.tokenizer).

    python benchmarks/full_size/folders.py --preset flux2-klein-4b --out DIR [--tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: gpu_real_scale_tiny
sys.path.insert(0, str(HERE))

GiB = 2**30
SHARD_BYTES = {"full": 2 * GiB, "tiny": 64 * 1024}  # tiny: several shards, so the index path is exercised too
DONE = "WRITTEN.json"  # a folder written to the end (a rerun reuses it)
README = (
    "# {label} with random weights\n\nWritten by benchmarks/cpu_full_size.py: the public layout and configs "
    "(dopsd/models/fullsize/) of {label}, {size} random weights (not the published ones), and a stand-in tokenizer "
    "(tokenizer/STAND-IN.txt). For rehearsals of dopsd only: its images are noise.\n"
)


def _fan_in(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    return max(1, math.prod(w.shape[1:])) if w is not None and w.dim() > 1 else 1


class Pool:
    """Uniform random numbers in [-1, 1), drawn once; tensors are cut from it at random offsets. Drawing every
    element anew costs ~10x more CPU time (minutes for a 6B-parameter model on a shared 2-core machine); the
    weights are then not independent across tensors, which changes neither time nor memory."""

    def __init__(self, gen: torch.Generator, dtype: torch.dtype, size: int = 1 << 24):
        self.gen, self.data = gen, torch.empty(size).uniform_(-1.0, 1.0, generator=gen).to(dtype)

    def take(self, shape: torch.Size, scale: float) -> torch.Tensor:
        n, size = math.prod(shape), self.data.numel()
        out = torch.empty(n, dtype=self.data.dtype)
        for start in range(0, n, size):
            part = min(size, n - start)
            offset = int(torch.randint(0, size - part + 1, (1,), generator=self.gen))
            out[start : start + part].copy_(self.data[offset : offset + part])
        return out.mul_(scale).view(shape)


def init_value(module: nn.Module, name: str, shape: torch.Size, dtype: torch.dtype, pool: Pool) -> torch.Tensor:
    """A weight with its layer's default scale (see the module doc)."""
    if "Norm" in type(module).__name__:
        return torch.full(shape, 1.0 if name == "weight" else 0.0, dtype=dtype)
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        bound = 1.0 / math.sqrt(_fan_in(module))
    else:
        bound = 0.02 * math.sqrt(3.0)  # std 0.02 (embeddings, pad tokens, position tables)
    return pool.take(shape, bound).to(dtype)


def write_weights(
    folder: Path, builder: Callable[[], nn.Module], stem: str, shard_bytes: int, dtype=torch.bfloat16, seed: int = 0
) -> dict[str, Any]:
    """Build on meta, then make and save the weights shard by shard; `stem` is `model` (transformers) or
    `diffusion_pytorch_model` (diffusers). Returns the module (meta) and what was written."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = builder()
    entries, seen = [], set()
    for mname, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is None or id(p) in seen:  # tied weights once (the first name: the embedding)
                continue
            seen.add(id(p))
            entries.append((f"{mname}.{pname}" if mname else pname, module, pname, p.shape))
    size = lambda e: math.prod(e[3]) * torch.empty((), dtype=dtype).element_size()  # noqa: E731
    shards: list[list] = [[]]
    for e in entries:
        if shards[-1] and sum(size(x) for x in shards[-1]) + size(e) > shard_bytes:
            shards.append([])
        shards[-1].append(e)
    pool = Pool(torch.Generator().manual_seed(seed), dtype)
    weight_map, total = {}, 0
    folder.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else f"{stem}.safetensors"
        tensors = {full: init_value(mod, pname, shape, dtype, pool) for full, mod, pname, shape in shard}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    params = sum(math.prod(e[3]) for e in entries)
    return {"model": model, "bytes": total, "files": len(shards), "params": params}


# --- the parts of each model -------------------------------------------------------------------------------------


def part_configs(preset: str, tiny: bool) -> dict[str, Any]:
    """{part: config dict} of the model (and its VLM teacher for Z-Image)."""
    from dopsd.models.registry import fullsize_config

    if tiny:
        from gpu_real_scale_tiny import TINY

        parts = {k: dict(v) for k, v in TINY[preset].items()}
        parts["text_encoder"].update(rope_theta=10000.0, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])
        if preset == "zimage-turbo":
            parts["vlm"] = tiny_vlm_config(parts["text_encoder"])
        return parts
    data = fullsize_config(preset)
    parts = {p: dict(data[p]) for p in ("transformer", "text_encoder", "vae")}
    if preset == "zimage-turbo":
        parts["scheduler"] = data["scheduler"]
        parts["vlm"] = dict(fullsize_config("qwen3-vl-4b-instruct")["model"])
    return parts


def tiny_vlm_config(text: dict[str, Any]) -> dict[str, Any]:
    """A tiny Qwen3-VL whose language model has the tiny text encoder's shapes (so its weights transplant)."""
    head = text["head_dim"]
    quarter = head // 2  # mrope_section sums to head_dim / 2
    section = [quarter - 2 * (quarter // 4), quarter // 4, quarter // 4]
    return {
        "model_type": "qwen3_vl",
        "tie_word_embeddings": False,
        "text_config": {
            **{k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")},
            **{k: text[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim")},
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": section,
                "mrope_interleaved": True,
            },
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": text["hidden_size"],
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
    }


def _diffusers_part(folder: Path, cls: Any, config: dict[str, Any], shard: int) -> dict[str, Any]:
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    out = write_weights(folder, lambda: cls.from_config(clean), "diffusion_pytorch_model", shard)
    out.pop("model").save_config(str(folder))
    return out


def _transformers_part(folder: Path, cls: Any, config: Any, shard: int) -> dict[str, Any]:
    out = write_weights(folder, lambda: cls(config), "model", shard)
    out.pop("model")
    config.save_pretrained(str(folder))
    return out


def write_vae(folder: Path, cls: Any, config: dict[str, Any]) -> dict[str, Any]:
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = cls.from_config(clean)
    if hasattr(vae, "bn"):  # FLUX.2: non-trivial latent statistics, so the normalisation is exercised
        with torch.no_grad():
            vae.bn.running_mean.uniform_(-0.5, 0.5)
            vae.bn.running_var.uniform_(0.5, 2.0)
    vae.to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    n = sum(p.numel() for p in vae.parameters())
    return {"bytes": 2 * n, "files": 1, "params": n}


# The published scheduler configs (tests/tiny_real.py builds its tiny pipelines with the same ones).
SCHEDULERS: dict[str, dict[str, Any]] = {
    "zimage-turbo": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
    "flux2-klein": {  # every klein size: dynamic shift
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "time_shift_type": "exponential",
    },
}


def scheduler(preset: str) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULERS["zimage-turbo" if preset == "zimage-turbo" else "flux2-klein"])


def write_scheduler(folder: Path, preset: str) -> None:
    scheduler(preset).save_pretrained(str(folder))


INDEX = {
    "zimage-turbo": {
        "_class_name": "ZImagePipeline",
        "text_encoder": ["transformers", "Qwen3Model"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "flux2-klein-4b": {
        "_class_name": "Flux2KleinPipeline",
        "is_distilled": True,
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    },
}


def write_model(preset: str, root: Path, tiny: bool) -> dict[str, Any]:
    """The model's folder (and, for Z-Image, the Qwen3-VL teacher's) under `root`; reused when complete."""
    import diffusers
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, Flux2Transformer2DModel, ZImageTransformer2DModel
    from tokenizer import build_tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    mode = "tiny" if tiny else "full"
    folder = root / f"{preset}-{mode}"
    vlm_folder = root / f"qwen3-vl-{mode}" if preset == "zimage-turbo" else None
    if (folder / DONE).is_file():
        return json.loads((folder / DONE).read_text())
    started, shard = time.time(), SHARD_BYTES[mode]
    parts = part_configs(preset, tiny)
    label = {"zimage-turbo": "Z-Image-Turbo", "flux2-klein-4b": "FLUX.2-klein-4B"}[preset]
    written: dict[str, Any] = {}
    transformer_cls = ZImageTransformer2DModel if preset == "zimage-turbo" else Flux2Transformer2DModel
    written["transformer"] = _diffusers_part(folder / "transformer", transformer_cls, parts["transformer"], shard)
    written["text_encoder"] = _transformers_part(
        folder / "text_encoder", Qwen3ForCausalLM, Qwen3Config(**parts["text_encoder"]), shard
    )
    vae_cls = AutoencoderKL if preset == "zimage-turbo" else AutoencoderKLFlux2
    written["vae"] = write_vae(folder / "vae", vae_cls, parts["vae"])
    write_scheduler(folder / "scheduler", preset)
    tok = build_tokenizer(folder / "tokenizer", qwen_ids=not tiny)
    index = {**INDEX[preset], "_diffusers_version": diffusers.__version__}
    index.update(
        scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"], tokenizer=["transformers", "Qwen2Tokenizer"]
    )
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    size = "tiny" if tiny else "full-size"
    (folder / "README.md").write_text(README.format(label=label, size=size))
    result: dict[str, Any] = {"pretrained": str(folder), "teacher_encoder": None}
    if vlm_folder is not None:
        cfg = dict(parts["vlm"])
        if tiny:  # the tiny vocabulary's ids; the full-size config keeps Qwen's (the stand-in has them)
            ids = {k: tok.convert_tokens_to_ids(t) for k, t in VLM_TOKENS.items()}
            cfg.update(ids)
        written["vlm"] = _transformers_part(vlm_folder, Qwen3VLForConditionalGeneration, Qwen3VLConfig(**cfg), shard)
        build_tokenizer(vlm_folder, qwen_ids=not tiny)
        write_image_processor(vlm_folder, tiny)
        (vlm_folder / "README.md").write_text(README.format(label="Qwen3-VL-4B-Instruct", size=size))
        result["teacher_encoder"] = str(vlm_folder)
    result["parts"] = {k: {kk: v[kk] for kk in ("bytes", "files", "params")} for k, v in written.items()}
    result["seconds"] = round(time.time() - started, 1)
    (folder / DONE).write_text(json.dumps(result, indent=2))
    return result


VLM_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def write_image_processor(folder: Path, tiny: bool) -> None:
    from transformers import Qwen2VLImageProcessorPil

    size = (
        {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
        if tiny
        else {"shortest_edge": 65536, "longest_edge": 16777216}
    )
    Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3, size=size
    ).save_pretrained(str(folder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(INDEX))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(json.dumps(write_model(args.preset, args.out, args.tiny)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
