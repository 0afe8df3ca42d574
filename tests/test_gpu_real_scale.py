"""benchmarks/gpu_real_scale.py with --tiny on the CPU: the same code path as on a GPU, on tiny configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_prints_the_table_and_writes_the_json(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_real_scale.py"), "--tiny", "--steps", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "random weights (no download)" in text and "random tensors of the right shapes" in text
    assert "step s" in text and "peak alloc" in text and "plan predicts" in text and "invariants" in text
    assert "versions: python" in text and "diffusers" in text  # which versions ran
    lines = [line.split() for line in text.splitlines() if line.startswith(("zimage-turbo ", "flux2-klein-4b "))]
    rows = [r for r in lines if r[2] != "sampling"]
    assert sorted((r[0], r[1]) for r in lines if r[2] == "sampling") == sorted(
        (m, q) for m in ("zimage-turbo", "flux2-klein-4b") for q in ("none", "int8")
    )
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        (m, q, k) for m in ("zimage-turbo", "flux2-klein-4b") for q in ("none", "int8") for k in ("sft", "dopsd")
    )
    result = json.loads(out.read_text())
    assert result["tiny"] is True and result["device"].startswith("cpu") and "random" in result["note"]
    assert len(result["runs"]) == 8
    assert result["invariants_hold"] is True and result["versions"]["torch"] == torch.__version__
    for run in result["runs"]:
        assert run["step_seconds"] > 0 and run["losses_finite"] and run["steps"] == 1
        inv = run["invariants"]  # every LoRA tensor got a gradient at the last step
        assert inv["holds"] and inv["zero_grad_tensors_last_step"] == 0 and inv["lora_tensors"] > 0
        if run["method"] == "dopsd":  # the EMA teacher moved, and its velocity differs from the student's
            assert inv["ema_unmoved_tensors"] == 0 and inv["weights_max_abs_diff"] > 0
            assert inv["student_teacher_max_abs_diff"] > inv["student_repeat_max_abs_diff"] == 0
        sampling = run["sampling"]  # the trainer's grid (few steps, control) and its health check, sampled
        assert sampling["images"] == 8 and sampling["predicted"]  # the planner's sampling parts, where it has them
        parts = ("grid", "control_grid", "health") if run["base"] == "none" else ("grid",)  # --full-sampling none
        assert all(part in sampling for part in parts) and len(parts) == 3 or "health" not in sampling
        for part in parts:
            assert sampling[part]["finite"] and sampling[part]["seconds"] > 0
            assert sampling[part]["peak_allocated_gb"] is None  # only measured on CUDA
        assert run["predicted_peak_gb"] > 0 and run["params"] > 0
        assert run["peak_allocated_gb"] is None  # only measured on CUDA
        assert (run["quantized_linears"] > 0) == (run["base"] == "int8")
        assert (run["rollout_steps"] is not None) == (run["method"] == "dopsd")
    by = {(r["preset"], r["base"], r["method"]): r for r in result["runs"]}
    # the planner sees the int8 base: its frozen weights are smaller than the unquantized ones (at this tiny size
    # the whole peak need not be: one dequantized weight at a time can outweigh what int8 saves)
    assert (
        by[("zimage-turbo", "int8", "sft")]["predicted_frozen_gb"]
        < by[("zimage-turbo", "none", "sft")]["predicted_frozen_gb"]
    )
