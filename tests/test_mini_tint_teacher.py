"""benchmarks/mini_tint_teacher.py end to end with one training step and a few samples: the folder it writes
loads as a miniature base, and its JSON holds both checks for both bases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from safetensors.torch import load_file

from dopsd.mini.adapter import WEIGHTS_DIR, load

ROOT = Path(__file__).resolve().parents[1]


def test_one_step_run_writes_a_loadable_base_and_both_checks(tmp_path):
    out = tmp_path / "tint"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "mini_tint_teacher.py"), "--out", str(out)]
    cmd += ["--iters", "1", "--samples", "2", "--same-colours", "1.0"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| continued base | same colours |" in proc.stdout and "σ=0.8" in proc.stdout

    base = load(SimpleNamespace(pretrained=str(out / "base.safetensors")))
    assert base.kind == "base" and base.default_steps == 32
    shipped, continued = load_file(WEIGHTS_DIR / "base.safetensors"), load_file(out / "base.safetensors")
    assert any(not continued[k].equal(v) for k, v in shipped.items())  # one step changed the weights
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["p_tint_same_colours"] == 1.0 and manifest["continued_from"]["file"].endswith(
        "base.safetensors"
    )

    result = json.loads((out / "tint_check.json").read_text())
    for name in ("shipped base", "continued base"):
        check = result["check"][name]
        for key in ("other scene, vlm", "same colours, reference"):
            assert 0.0 <= check[key]["mean"] <= 1.0
        assert 0.0 <= check["concept colours, vlm"]["fidelity"] <= 1.0
        errors = result["prediction_error"][name]
        assert len(errors["exact image in context (vlm)"]) == 4 and all(
            e >= 0 for e in errors["caption only, untinted"]
        )
