"""`dopsd demo` end to end on the shipped turbo: the files and summary.json format the README promises, a second
run never overwrites the first, and (at half the demo's budget) what the demo shows, measured here."""

import json

import pytest
import torch
from PIL import Image

from dopsd.cli import main

torch.set_num_threads(1)


def test_demo_writes_summary_grid_and_loras_and_keeps_earlier_outputs(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--samples", "8", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"before", "sft", "dopsd", "seconds"} and summary["seconds"] > 0
    for name in ("before", "sft", "dopsd"):
        assert set(summary[name]) == {"concept_fidelity", "fewstep_quality", "drift", "unrelated_accuracy"}
        assert 0.0 <= summary[name]["unrelated_accuracy"] <= 1.0
        assert 0.0 <= summary[name]["concept_fidelity"] <= 1.0 and 0.0 < summary[name]["fewstep_quality"] <= 1.0
    assert summary["before"]["drift"] == 0.0 and summary["sft"]["drift"] > 0.0 and summary["dopsd"]["drift"] > 0.0
    assert (out / "sft" / "lora.safetensors").is_file() and (out / "dopsd" / "lora.safetensors").is_file()
    grid = Image.open(out / "demo.png")
    # before | SFT | D-OPSD, each sample beside its detail, magnified ×4, × 8 prompts, then the zoomed crops
    assert grid.width > 6 * 96 and grid.height > 8 * 96 + 12 * 16
    first = (out / "summary.json").read_bytes()

    assert main(["demo", "--steps", "1", "--samples", "8", "--out", str(out)]) == 0
    assert (out / "summary.json").read_bytes() == first  # the earlier run is untouched
    second = json.loads((tmp_path / "demo-1" / "summary.json").read_text())
    assert second["sft"]["drift"] > 0.0
    assert second["before"] == summary["before"]  # the untouched turbo, same seed and noise: the same numbers


@pytest.mark.slow
def test_demo_shows_dopsd_learning_the_concept_while_keeping_few_step_quality(tmp_path):
    """Half the demo's budget (100 steps per method, prior preservation on for both), all 64 evaluation samples.
    Measured at 100 steps on mini-recipe-3's weights (seed 0): D-OPSD concept fidelity 0.72, few-step quality
    0.902 (untouched 0.901), unrelated accuracy 0.97; SFT 0.41 / 0.776 / 0.95. The full demo (200 steps) is in
    the README."""
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "100", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    before, sft, dopsd = s["before"], s["sft"], s["dopsd"]
    assert dopsd["concept_fidelity"] >= 0.6 and dopsd["concept_fidelity"] >= sft["concept_fidelity"] + 0.15, s
    assert abs(dopsd["fewstep_quality"] - before["fewstep_quality"]) <= 0.03 * before["fewstep_quality"], s
    assert sft["fewstep_quality"] <= 0.93 * before["fewstep_quality"], s  # SFT clearly below
    assert dopsd["unrelated_accuracy"] >= 0.85, s
