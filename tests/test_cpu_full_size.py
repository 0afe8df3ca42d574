"""benchmarks/cpu_full_size.py --tiny: the full-size rehearsal's whole path on tiny models of the same architectures
(folders in the public layout written shard by shard, `dopsd plan/probe/train`, a SIGKILL mid-step and `--resume`,
`dopsd export/sample`, the diffusers pipeline with `load_lora_weights`), and its results file and docs page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~10 processes' worth of work: the planner on both models, a killed and a resumed run
def test_tiny_rehearsal_runs_every_phase_and_every_check_holds(tmp_path):
    work = tmp_path / "work"
    out, docs = tmp_path / "full-size-cpu.json", tmp_path / "full-size.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_full_size.py"), "--tiny", "--work", str(work)]
        + ["--json", str(out), "--docs", str(docs)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [e["preset"] for e in result["models"]] == ["flux2-klein-4b", "zimage-turbo"]
    for e in result["models"]:
        assert e["status"] == "complete" and e["problems"] == []
        assert e["resolution"] == [32, 32] and e["steps"] == 3 and len(e["step_seconds_each"]) == 3
        phases = e["phases"]
        for name in ("write", "plan-cpu", "probe", "train", "resume", "export", "sample", "pipeline"):
            assert phases[name]["rc"] == 0, (e["preset"], name, phases[name])
        assert phases["kill"]["rc"] == -9 and phases["kill"]["killed"].startswith("SIGKILL by design mid-step")
        # the learning invariants of the real trainer's steps
        inv = e["invariants"]
        assert inv["holds"] and inv["zero_grad_tensors_last_step"] == 0 and inv["ema_unmoved_tensors"] == 0
        assert inv["zero_grad_tensors_first_step"] == inv["lora_tensors"] // 2  # B = 0 at the start: A gets none
        assert inv["student_teacher_max_abs_diff"] > inv["student_repeat_max_abs_diff"] == 0
        # killed mid-step and resumed: the same LoRA, EMA and optimizer state as the uninterrupted run
        assert e["resumed_bit_exact"] is True
        # the exported LoRA in the diffusers pipeline draws dopsd sample's image, and the LoRA's own effect is larger
        assert e["export_max_abs_diff"] is not None and e["export_lora_effect_max_abs_diff"] is not None
        assert e["export_max_abs_diff"] < e["export_lora_effect_max_abs_diff"]
        # measured and planned memory are recorded for the training steps
        assert e["peak_tensor_gib"] > 0 and e["planned_gib"] > 0 and e["peak_rss_gib"] > 0
        assert e["planned"]["cpu"]["target"] == "cpu"
    # the folders are in the public layout: sharded safetensors with an index, the stand-in tokenizer says so
    model = work / "models" / "zimage-turbo-tiny"
    index = json.loads((model / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "ZImagePipeline"
    assert "STAND-IN" in (model / "tokenizer" / "STAND-IN.txt").read_text()
    page = docs.read_text()
    assert "| FLUX.2-klein-4B | 32×32 | 3 |" in page and "| Z-Image-Turbo | 32×32 | 3 |" in page
