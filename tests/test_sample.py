"""`dopsd sample`: one PNG + JSON sidecar per (prompt, seed), each with its own noise, reproducible alone."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from dopsd import cli


def test_sample_writes_each_sample_with_its_json_and_redraws_one_alone(tmp_path, tiny_mini):
    """Every (prompt, seed) of `dopsd sample` has its own noise, its own PNG and a JSON sidecar; one sample drawn
    again alone (its prompt, --prompt-index and seed) is bit-identical; nothing existing is replaced."""
    prompts = ["a red circle", "a blue square on a gray background"]
    common = ["sample", "mini", f"model.pretrained={tiny_mini}"]
    grid = tmp_path / "grid.png"
    assert (
        cli.main([*common, "--prompt", prompts[0], "--prompt", prompts[1], "--seeds", "0", "5", "--out", str(grid)])
        == 0
    )
    folder = tmp_path / "grid"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == [
        "p00-a-red-circle-s0.png",
        "p00-a-red-circle-s5.png",
        "p01-a-blue-square-on-a-gray-background-s0.png",
        "p01-a-blue-square-on-a-gray-background-s5.png",
    ]
    meta = json.loads((folder / "p01-a-blue-square-on-a-gray-background-s5.json").read_text())
    assert meta["prompt"] == prompts[1] and meta["seed"] == 5 and meta["prompt_index"] == 1 and meta["steps"] == 4
    assert meta["model"]["family"] == "mini" and meta["lora"] is None and "--prompt-index 1" in meta["reproduce"]
    # the grid is made of the single samples
    cells = np.asarray(Image.open(grid))
    assert cells.shape[0] > 2 * 24 and cells.shape[1] > 2 * 24

    # two prompts of one grid no longer share noise: the seed-0 noise of prompt 0 and prompt 1 differ
    from dopsd.core.sampler import sample_seed, seed_noise

    a, b = seed_noise((3, 24, 24), [sample_seed(0, 0), sample_seed(0, 1)])
    assert not torch.equal(a, b) and torch.equal(a, seed_noise((3, 24, 24), [0])[0])

    # one sample alone, bit for bit
    alone = tmp_path / "alone.png"
    assert cli.main([*common, "--prompt", prompts[1], "--prompt-index", "1", "--seeds", "5", "--out", str(alone)]) == 0
    redrawn = (tmp_path / "alone" / "p01-a-blue-square-on-a-gray-background-s5.png").read_bytes()
    original = folder / "p01-a-blue-square-on-a-gray-background-s5.png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(redrawn))), np.asarray(Image.open(original)))
    # without --prompt-index it is prompt 0: other noise, another picture
    other = tmp_path / "other.png"
    assert cli.main([*common, "--prompt", prompts[1], "--seeds", "5", "--out", str(other)]) == 0
    assert not np.array_equal(
        np.asarray(Image.open(tmp_path / "other" / "p00-a-blue-square-on-a-gray-background-s5.png")),
        np.asarray(Image.open(original)),
    )

    # an existing sample file is never replaced without --overwrite (a new grid name, the same sample folder)
    before = original.read_bytes()
    (tmp_path / "grid.png").rename(tmp_path / "kept.png")
    assert cli.main([*common, "--prompt", prompts[0], "--prompt", prompts[1], "--seeds", "5", "--out", str(grid)]) == 2
    assert original.read_bytes() == before and not grid.exists()
