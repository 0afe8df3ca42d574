"""The done signal (dopsd.training.done) on the tiny random miniature: measured and logged at each sampling, its
lowest step in summary.json, the opt-in early stop (exit 0, a clear status), off by default; and its palette."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_mini, tiny_config, write_concept_folder

import dopsd
from dopsd.config import ConfigError
from dopsd.training.done import DONE, earliest_as_good, palette, palette_distance


def _run(tmp_path: Path, **overrides):
    data = write_concept_folder(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, **{"model.pretrained": str(save_tiny_mini(tmp_path / "m")), **overrides})
    return dopsd.train(cfg), Path(cfg.train.output_dir)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / DONE).read_text().splitlines()]


def test_palette_is_position_invariant_and_sees_colour():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 24, 24, generator=g) * 2 - 1
    moved = image.roll(5, dims=-1)  # the same pixels elsewhere
    tinted = (image * 0.6 + 0.4 * torch.tensor([0.8, 0.4, -0.6]).view(1, 3, 1, 1)).clamp(-1, 1)
    d = palette_distance(palette(image), palette(torch.cat([moved, tinted])))
    assert d.shape == (1, 2)
    assert d[0, 0] < 1e-6 < 0.1 < d[0, 1]


def test_earliest_as_good_is_the_start_of_a_plateau_within_the_sampling_noise():
    g = torch.Generator().manual_seed(0)
    noise = 0.02 * torch.randn(6, 32, generator=g)
    # a fall to a plateau at step 20 that creeps down by far less than the samples' spread, then a clear fall
    level = torch.tensor([1.0, 0.6, 0.3, 0.299, 0.298, 0.297])
    steps = [0, 10, 20, 30, 40, 50]
    assert earliest_as_good(steps, (level[:, None] + noise).tolist()) == 20
    # a real improvement, larger than the noise allows, is not "as good": the lowest step stays the answer
    level[-1] = 0.25
    assert earliest_as_good(steps, (level[:, None] + noise).tolist()) == 50
    # a clear minimum with a rise after it: the minimum (earlier steps are worse)
    rise = torch.tensor([1.0, 0.5, 0.2, 0.4, 0.6, 0.8])
    assert earliest_as_good(steps, (rise[:, None] + noise).tolist()) == 20
    assert earliest_as_good([0], [[0.5, 0.4]]) == 0  # one measurement: itself


def test_measured_at_each_sampling_logged_and_lowest_step_in_the_summary(tmp_path):
    result, out = _run(tmp_path, **{"train.max_steps": 6, "sample.every": 2, "log.tensorboard": True})
    records = _records(out)
    assert [r["step"] for r in records] == [0, 2, 4, 6]  # before training, each interval, the end
    # the grid's own images are reused: 2 prompts × 2 seeds, nothing sampled apart
    assert all(r["samples"] == 4 and r["features"] == "palette" and r["distance"] > 0 for r in records)
    lowest = min(records, key=lambda r: r["distance"])
    done = result.summary["done"]
    assert done["best_step"] == lowest["step"] and done["best_distance"] == pytest.approx(lowest["distance"])
    assert done["last_step"] == 6 and done["stopped_early"] is False and done["measurements"] == 4
    assert json.loads((out / "summary.json").read_text())["done"] == done
    # every sample's distance, the same samples each time; the earliest step as good as the lowest
    assert all(len(r["per_sample"]) == 4 and r["distance"] == pytest.approx(sum(r["per_sample"]) / 4) for r in records)
    steps, per_sample = [r["step"] for r in records], [r["per_sample"] for r in records]
    assert done["as_good_step"] == records[-1]["as_good_step"] == earliest_as_good(steps, per_sample)
    assert done["as_good_step"] <= done["best_step"]
    assert result.steps == 6  # off by default: no early stop
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("done/distance")] == [0, 2, 4, 6]


def test_training_captions_are_sampled_apart_when_the_grid_shows_other_prompts(tmp_path):
    result, out = _run(tmp_path, **{"sample.prompts": ["a red circle", "a blue square"], "train.max_steps": 2})
    records = _records(out)
    assert [r["step"] for r in records] == [0, 2]
    assert all(r["samples"] == 2 * 2 for r in records)  # 2 training examples (sample.num_prompts) × 2 seeds


def test_early_stop_stops_exits_0_and_says_why(tmp_path):
    # patience 1: the run stops at the first interval that is not a new low, well before max_steps
    result, out = _run(
        tmp_path, **{"train.max_steps": 40, "sample.every": 1, "train.stop_when_done": True, "train.done_patience": 1}
    )
    done = result.summary["done"]
    records = _records(out)
    assert done["stopped_early"] is True and result.steps < 40
    assert result.summary["status"] == "ok" and result.weights is not None and result.weights.is_file()
    assert records[-1]["step"] == result.steps and records[-2]["distance"] <= records[-1]["distance"]
    assert f"lowest at step {done['best_step']}" in done["reason"] and "train.stop_when_done" in done["reason"]
    # a checkpoint of the stopping step, like the end of a finished run
    assert (out / "checkpoints" / f"step-{result.steps:07d}").is_dir()


def test_early_stop_needs_sampling_intervals(tmp_path):
    data = write_concept_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match="train.stop_when_done.*sample.every"):
        dopsd.train(tiny_config(tmp_path, data, **{"train.stop_when_done": True, "sample.every": 0}))


def test_off_writes_nothing(tmp_path):
    result, out = _run(tmp_path, **{"sample.done": False, "train.max_steps": 2})
    assert result.summary["done"] is None and not (out / DONE).exists()


def test_the_command_exits_0_on_an_early_stop(tmp_path):
    data = write_concept_folder(tmp_path / "data")
    model = save_tiny_mini(tmp_path / "m")
    cfg = tiny_config(tmp_path, data, **{"model.pretrained": str(model)})
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    args = ["train.max_steps=40", "sample.every=1", "train.stop_when_done=true", "train.done_patience=1"]
    run = subprocess.run(
        [sys.executable, "-m", "dopsd.cli", "train", str(tmp_path / "c.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "done signal: lowest at step" in run.stdout and "stopped early at step" in run.stdout
    assert "no lower in the 1 sampling intervals since" in run.stdout  # the stop's reason, when it stops


def test_a_feature_model_folder_gives_its_embedding_distance(tmp_path):
    from tiny_encoders import build_dinov2

    dino = build_dinov2(tmp_path / "dino")
    result, out = _run(tmp_path, **{"sample.done_features": str(dino), "train.max_steps": 2})
    records = _records(out)
    assert [r["step"] for r in records] == [0, 2]
    assert all(r["features"].startswith("dinov2") and 0 < r["distance"] <= 2 for r in records)
    assert result.summary["done"]["features"].startswith("dinov2")


def test_a_wrong_feature_folder_is_refused_before_the_run_starts(tmp_path):
    from dopsd.models.local import ModelFolderError

    data = write_concept_folder(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="sample.done_features"):
        dopsd.train(tiny_config(tmp_path, data, **{"sample.done_features": str(tmp_path / "empty")}))
    assert not (tmp_path / "run").exists()
