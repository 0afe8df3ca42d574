"""Feature caching one encoder at a time: the transformer is not loaded while the encoders run, and the cached
features are bit for bit what they are with everything loaded at once."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from tiny_encoders import build_qwen3_vl
from tiny_real import build_flux2, build_zimage, train_config, write_pairs
from torch import nn

from dopsd.data.cache import FeatureCache, build_features, model_fingerprint
from dopsd.data.dataset import check_dataset
from dopsd.models.registry import load_adapter

torch.set_num_threads(1)
SIZE = 32
CAPTIONS = ["a red cat", "a [V] teapot on a wooden table"]
# The encoders' top-level modules as they run during caching (the VAE through its encoder, not its forward).
ENCODERS = {"Qwen3Model", "Qwen3VLModel", "Encoder"}


def setup(tmp_path: Path, family: str):
    data = write_pairs(tmp_path / "data", CAPTIONS, SIZE, seed=7)
    if family == "zimage":
        extra = [
            f"model.pretrained={build_zimage(tmp_path / 'zi')}",
            f"model.teacher_encoder={build_qwen3_vl(tmp_path / 'vl')}",
        ]
        preset = "zimage-turbo"
    else:
        extra = [f"model.pretrained={build_flux2(tmp_path / 'fx')}"]  # reference teacher: text encoder + VAE
        preset = "flux2-klein-4b"
    cfg = train_config(preset, tmp_path, data, SIZE, "method.name=hybrid", *extra)  # teacher and latents too
    return cfg, check_dataset(cfg.data, cfg.model).examples


def cache_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def transformers_alive() -> int:
    return sum(
        1 for o in gc.get_objects() if type(o).__name__.endswith("Transformer2DModel") and isinstance(o, nn.Module)
    )


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_encoders_run_without_the_transformer_and_cache_the_same_bits(tmp_path, family):
    cfg, examples = setup(tmp_path, family)
    prompts = ["a blue dog in the park"]
    gc.collect()
    assert transformers_alive() == 0

    # Sequential (what the trainer does): every encoder call sees no transformer in memory.
    seen: dict[str, int] = {}

    def watch(module, args):
        name = type(module).__name__
        if name in ENCODERS and name not in seen:
            gc.collect()
            seen[name] = transformers_alive()

    adapter = load_adapter(cfg.model, "cpu", torch.float32)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(watch)
    try:
        build_features(
            adapter,
            examples,
            cfg,
            FeatureCache(tmp_path / "sequential", model_fingerprint(cfg, adapter)),
            prompts,
            need_latents=True,
            need_teacher=True,
        )
    finally:
        handle.remove()
    expected = {"zimage": {"Qwen3Model", "Qwen3VLModel", "Encoder"}, "flux2": {"Qwen3Model", "Encoder"}}[family]
    assert expected <= set(seen) and all(n == 0 for n in seen.values()), seen
    adapter.release_encoders()
    assert adapter.network is not None and transformers_alive() == 1  # loaded once asked for, after the encoders

    # Everything loaded at once (the transformer built before any encoder runs, as the adapters used to).
    together = load_adapter(cfg.model, "cpu", torch.float32)
    assert together.network is not None
    build_features(
        together,
        examples,
        cfg,
        FeatureCache(tmp_path / "together", model_fingerprint(cfg, together)),
        prompts,
        need_latents=True,
        need_teacher=True,
    )
    a, b = cache_files(tmp_path / "sequential"), cache_files(tmp_path / "together")
    kinds = {Path(k).name.split("-")[0] for k in a}
    assert kinds == {"student", "teacher", "latents"} and len(a) >= 7
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
