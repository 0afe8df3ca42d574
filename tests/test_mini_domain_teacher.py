"""benchmarks/mini_domain_teacher.py end to end on a small probe: it writes every reference's row for each
tint, and the frozen teacher carries the tint in its training condition (a background named, the reference in
the caption's colours) far more often than with a random training image as reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_teacher_table_for_one_tint(tmp_path):
    out = tmp_path / "teacher.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "mini_domain_teacher.py"), "--out", str(out)]
    cmd += ["--tints", "sepia", "--n", "32", "--pairs", "32", "--work", str(tmp_path / "work")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["tints"]["sepia"]
    assert len([k for k in rows if k.startswith("no background")]) == 5
    assert rows["samples"]["background named"] == 32 and 0 < rows["samples"]["no background"] < 32
    named = rows["background named: reference in its colours and background"]
    other = rows["no background: reference = random training image"]
    assert all(0.0 <= s[k] <= 1.0 for s in (named, other) for k in ("strict", "over", "under"))
    assert named["strict"] >= 0.8 and other["strict"] < named["strict"] - 0.3
    assert "| no background: reference = nearest training image |" in proc.stdout

    bad = subprocess.run(cmd[:2] + ["--out", str(out), "--tints", "purple"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "unknown tints ['purple']" in bad.stderr
