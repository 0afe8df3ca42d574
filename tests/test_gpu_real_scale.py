"""benchmarks/gpu_real_scale.py with --tiny on the CPU: the same code path as on a GPU, on tiny configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert "step s" in text and "peak alloc" in text and "plan predicts" in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("zimage-turbo ", "flux2-klein-4b "))]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        (m, q, k) for m in ("zimage-turbo", "flux2-klein-4b") for q in ("none", "int8") for k in ("sft", "dopsd")
    )
    result = json.loads(out.read_text())
    assert result["tiny"] is True and result["device"].startswith("cpu") and "random" in result["note"]
    assert len(result["runs"]) == 8
    for run in result["runs"]:
        assert run["step_seconds"] > 0 and run["losses_finite"] and run["steps"] == 1
        assert run["predicted_peak_gb"] > 0 and run["params"] > 0
        assert run["peak_allocated_gb"] is None  # only measured on CUDA
        assert (run["quantized_linears"] > 0) == (run["base"] == "int8")
        assert (run["rollout_steps"] is not None) == (run["method"] == "dopsd")
    by = {(r["preset"], r["base"], r["method"]): r for r in result["runs"]}
    # the planner sees the int8 base: smaller than the unquantized one
    assert (
        by[("zimage-turbo", "int8", "sft")]["predicted_peak_gb"]
        < by[("zimage-turbo", "none", "sft")]["predicted_peak_gb"]
    )
