"""Shared fixtures: one thread, a tiny concept dataset from the miniature world, tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


def write_concept_folder(folder: Path, n: int = 4, concept: str = "orange", seed: int = 0) -> Path:
    """n renders of a held-out concept colour with same-name .txt captions (the `sks` word names it)."""
    from dopsd.mini import world

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    scenes = [world.concept_scene(concept, g) for _ in range(n)]
    from dopsd.data.images import to_pil

    for i, (scene, image) in enumerate(zip(scenes, to_pil(world.render(scenes)))):
        image.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(scene.caption() + "\n" + scene.caption(with_background=False) + "\n")
    return folder


def tiny_config(tmp_path: Path, data: Path, **sections) -> "object":
    """A fast config for the tiny random miniature: few steps, no sampling noise in timing."""
    from dopsd.config import load_config

    overrides = {
        "data.path": str(data),
        "train.output_dir": str(tmp_path / "run"),
        "train.max_steps": 4,
        "train.batch_size": 2,
        "train.checkpoint_every": 2,
        "train.keep_checkpoints": 5,
        "sample.every": 0,
        "sample.seeds": [0, 1],
        "sample.num_prompts": 2,
        "sample.control_steps": 8,
        "log.progress": False,
        "cache.dir": str(tmp_path / "cache"),
        "lora.rank": 4,
        "lora.alpha": 4.0,
        "optim.lr": 1e-3,
        "method.ema_decay": 0.9,
        "model.teacher_context": "reference",  # the random encoder barely sees images; the reference path does
    }
    overrides.update(sections)
    return load_config("mini", [f"{k}={v!r}" if isinstance(v, list) else f"{k}={v}" for k, v in overrides.items()])


def save_tiny_mini(folder: Path, seed: int = 0) -> Path:
    """The tiny random miniature saved in the recipe-folder layout, so configs and the CLI can load it by path."""
    import json

    from safetensors.torch import save_file

    from dopsd.mini.adapter import tiny_random_adapter

    adapter = tiny_random_adapter(seed)
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"dit.{k}": v.contiguous() for k, v in adapter.network.state_dict().items()}
    state.update({f"encoder.{k}": v.contiguous() for k, v in adapter.encoder.state_dict().items()})
    save_file(state, str(folder / "turbo.safetensors"))
    (folder / "manifest.json").write_text(json.dumps({"config": adapter.cfg.to_dict()}))
    return folder


@pytest.fixture
def tiny_mini(tmp_path: Path) -> Path:
    return save_tiny_mini(tmp_path / "tiny_mini")


@pytest.fixture
def concept_data(tmp_path: Path) -> Path:
    return write_concept_folder(tmp_path / "data")


@pytest.fixture
def tiny_adapter():
    from dopsd.mini.adapter import tiny_random_adapter

    return tiny_random_adapter(0)
