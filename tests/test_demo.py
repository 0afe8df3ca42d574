"""`dopsd demo` end to end on the shipped turbo (a few steps): the files and summary.json format the README
promises, and a second run never overwrites the first."""

import json

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
        assert set(summary[name]) == {"concept_fidelity", "fewstep_quality", "drift"}
        assert 0.0 <= summary[name]["concept_fidelity"] <= 1.0 and 0.0 < summary[name]["fewstep_quality"] <= 1.0
    assert summary["before"]["drift"] == 0.0 and summary["sft"]["drift"] > 0.0 and summary["dopsd"]["drift"] > 0.0
    assert (out / "sft" / "lora.safetensors").is_file() and (out / "dopsd" / "lora.safetensors").is_file()
    grid = Image.open(out / "demo.png")
    assert grid.width > 3 * 24 and grid.height > 8 * 24  # before | SFT | D-OPSD × 8 prompts
    first = (out / "summary.json").read_bytes()

    assert main(["demo", "--steps", "1", "--samples", "8", "--out", str(out)]) == 0
    assert (out / "summary.json").read_bytes() == first  # the earlier run is untouched
    second = json.loads((tmp_path / "demo-1" / "summary.json").read_text())
    assert second["sft"]["drift"] > 0.0
    assert second["before"] == summary["before"]  # the untouched turbo, same seed and noise: the same numbers
