"""`dopsd eval` on a tiny Z-Image with a dopsd-trained LoRA, and the feature models on tiny random checkpoints."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_encoders import build_clip, build_dinov2, build_qwen3_vl
from tiny_real import build_zimage, dopsd_lora_steps, images

from dopsd.cli import main as cli
from dopsd.data.images import to_tensor
from dopsd.models import zimage
from dopsd.models.local import ModelFolderError
from dopsd.tools.evaluate import measure
from dopsd.tools.features import PixelFeatures, TextImageScorer, load_image_features

torch.set_num_threads(1)
SIZE = 32
CAPTIONS = ["a [V] teapot on a wooden table", "a [V] teapot in the park"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Z-Image folder, a two-pair dataset, a run folder with a trained LoRA, tiny DINOv2 and CLIP."""
    from dopsd.config import load_config
    from dopsd.lora.trained import save_trained

    root = tmp_path_factory.mktemp("eval")
    model, vlm = build_zimage(root / "zi"), build_qwen3_vl(root / "vl")
    data = root / "data"
    data.mkdir()
    targets = images(2, SIZE, seed=21)
    for i, (im, cap) in enumerate(zip(targets, CAPTIONS)):
        im.save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(cap)
    config = load_config(
        "zimage-turbo",
        [
            f"model.pretrained={model}",
            f"model.teacher_encoder={vlm}",
            f"model.height={SIZE}",
            f"model.width={SIZE}",
            "model.max_caption_tokens=32",
            "model.dtype=float32",
            f"data.path={data}",
            "data.buckets=false",
            "lora.rank=4",
            "lora.alpha=8",
        ],
    )
    adapter = zimage.load(config.model)
    dopsd_lora_steps(adapter, CAPTIONS, targets, steps=3, lr=2e-2, rank=4, alpha=8.0, every=2)
    run = root / "run"
    run.mkdir()
    save_trained(run, adapter.network, {"rank": 4, "alpha": 8.0, "targets": adapter.default_lora_targets()}, {})
    (run / "config.yaml").write_text(config.to_yaml())
    return SimpleNamespace(
        root=root, run=run, targets=targets, dino=build_dinov2(root / "dino"), clip=build_clip(root / "clip")
    )


def test_eval_cli_writes_metrics_and_grids(world, capsys):
    out = world.root / "out"
    rc = cli(
        [
            "eval",
            str(world.run),
            "--feature-model",
            str(world.dino),
            "--clip-model",
            str(world.clip),
            "--control-steps",
            "12",
            "--seeds",
            "0",
            "1",
            "--unseen",
            "a [V] teapot on a beach",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr()
    report = json.loads((out / "eval.json").read_text())
    assert report["feature_model"].startswith("dinov2") and report["clip_model"].startswith("clip")
    assert report["steps"] == 8 and report["train_prompts"] == CAPTIONS
    keys = {
        "dino_d_train",
        "dino_d_train_nearest",
        "dino_d_unseen_nearest",
        "clip_s_train",
        "clip_s_unseen",
        "gap_pixels",
        "gap_features",
    }
    for variant in ("base", "lora"):
        assert set(report[variant]) == keys
        assert all(torch.isfinite(torch.tensor(v)) for v in report[variant].values())
        assert 0 <= report[variant]["dino_d_train_nearest"] <= report[variant]["dino_d_train"] + 1e-6
        assert report[variant]["gap_pixels"] > 0  # 8 vs 12 steps of the same noise differ
    assert report["base"] != report["lora"]  # the trained LoRA changes the samples
    for name in ("targets.png", "base_8steps.png", "lora_8steps.png", "base_12steps.png", "lora_12steps.png"):
        assert (out / name).is_file()
    assert "lora dino_d_train=" in capsys.readouterr().out
    # Each (prompt, seed) has its own noise, as `dopsd sample` draws it: the second prompt's seed-1 cell of the
    # LoRA grid is what `dopsd sample` gives for that prompt number and seed alone.
    alone = world.root / "alone.png"
    args = ["sample", str(world.run), "--prompt", CAPTIONS[1], "--prompt-index", "1", "--seeds", "1", "--out"]
    assert cli([*args, str(alone)]) == 0, capsys.readouterr()
    (png,) = (world.root / "alone").glob("p01-*-s1.png")
    drawn = np.asarray(Image.open(png).convert("RGB"))
    assert np.abs(grid_cell(out / "lora_8steps.png", 1, 1, cols=2).astype(int) - drawn).max() <= 2
    other_prompt = grid_cell(out / "lora_8steps.png", 0, 1, cols=2).astype(int)
    assert np.abs(other_prompt - drawn).mean() > 5  # different noise, not only a different caption


def grid_cell(path, row: int, col: int, cols: int, pad: int = 2) -> np.ndarray:
    """One image of a `grid_image` grid, at its own resolution (the grid is magnified by an integer factor)."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    scale = grid.shape[1] // (cols * (SIZE + pad) + pad)
    y, x = (pad + row * (SIZE + pad)) * scale, (pad + col * (SIZE + pad)) * scale
    return grid[y : y + SIZE * scale : scale, x : x + SIZE * scale : scale]


def test_eval_without_feature_models_uses_the_pixel_fallback(world):
    from dopsd.config import load_config
    from dopsd.tools.evaluate import evaluate

    config = load_config(str(world.run / "config.yaml"))
    report = evaluate(
        config,
        world.run / "lora.safetensors",
        world.root / "px",
        unseen=[],
        seeds=[0],
        control_steps=0,
        compare_base=False,
    )
    assert report["feature_model"] == "pixels" and "not comparable" in report["note"]
    assert set(report["lora"]) == {"dino_d_train", "dino_d_train_nearest", "dino_d_unseen_nearest"}
    assert report["lora"]["dino_d_unseen_nearest"] != report["lora"]["dino_d_unseen_nearest"]  # NaN: no unseen prompts


def test_metric_definitions(world):
    """DINO-D is 0 for a sample equal to its target and grows when the sample is another image."""
    feats = load_image_features(world.dino)
    targets = world.targets
    as_tensor = lambda ims: to_tensor(ims, (SIZE, SIZE))
    same = measure(as_tensor(targets), None, CAPTIONS, 1, 2, targets, feats, None)
    assert same["dino_d_train"] == pytest.approx(0, abs=1e-5)
    swapped = measure(as_tensor(targets[::-1]), as_tensor(targets), CAPTIONS, 1, 2, targets, feats, None)
    assert swapped["dino_d_train"] > 1e-4 and swapped["dino_d_train_nearest"] == pytest.approx(0, abs=1e-5)
    assert swapped["gap_pixels"] > 0 and swapped["gap_features"] > 0


def test_feature_models_load_and_score(world):
    ims = images(3, 48, seed=2)
    for model in (world.dino, world.clip, None):
        f = load_image_features(model)(ims)
        assert f.shape[0] == 3 and torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    scorer = TextImageScorer(world.clip)
    s = scorer(["a red cat", "a blue dog in the park", "a [V] teapot"], ims)
    assert s.shape == (3,) and bool((s.abs() <= 1).all())
    assert len(set(scorer.text_features(["a red cat", "turn the sky orange"]).sum(1).tolist())) == 2  # text matters
    assert isinstance(load_image_features(None), PixelFeatures)
    with pytest.raises(ModelFolderError, match="no text tower"):
        TextImageScorer(world.dino)
    with pytest.raises(ModelFolderError, match="has no config.json"):
        load_image_features(world.root / "data")


def test_eval_on_the_miniature_samples_unseen_prompts_it_can_read(tmp_path):
    """Without --unseen, the unseen prompts are the model's own: for the miniature, its vocabulary (the photo
    templates of the real models would be refused as unreadable prompts)."""
    import math

    from conftest import write_concept_folder

    from dopsd.config import load_config
    from dopsd.mini import world
    from dopsd.tools.evaluate import evaluate

    data = write_concept_folder(tmp_path / "data", n=2)
    config = load_config("mini", [f"data.path={data}", "data.trigger_word=sks"])
    report = evaluate(config, None, tmp_path / "eval", seeds=[0], control_steps=0, max_prompts=2)
    assert len(report["unseen_prompts"]) == 4 and all("sks" in p for p in report["unseen_prompts"])
    assert all(world.caption_issue(p) is None for p in report["unseen_prompts"])
    assert math.isfinite(report["base"]["dino_d_unseen_nearest"])
