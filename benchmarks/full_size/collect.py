"""One model's results, read back from the rehearsal's work folder (so a run cut short, or still running, reports
what it has): each phase's record (WORK/stats/), the plans (WORK/logs/), the learning invariants of the train
phase, the resumed run against the uninterrupted one, and the pipeline check."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import report

PHASES = ("write", "plan-cpu", "plan", "probe", "train", "kill", "resume", "export", "sample", "pipeline")
BY_DESIGN = "SIGKILL by design"


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    if not (a.is_file() and b.is_file()):
        return False
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and bool((x[k] == y[k]).all()) for k in x)


def resumed_bit_exact(a: Path, b: Path, step: int) -> dict[str, bool]:
    """The final LoRA and the last checkpoint's trainable weights, EMA teacher and optimizer state, file by file."""
    ck = f"checkpoints/step-{step:07d}"
    files = ["lora.safetensors"] + [f"{ck}/{f}.safetensors" for f in ("trainable", "teacher", "optimizer")]
    return {f: same_tensors(a / f, b / f) for f in files}


def invariants(train: dict[str, Any]) -> dict[str, Any]:
    """The learning invariants from the train phase's record (phase.py --checks)."""
    steps, checks = train.get("steps") or [], train.get("checks") or {}
    if not steps or not checks:
        return {"holds": False, "problem": "the train phase recorded no checks"}
    last = steps[-1]
    out = {
        "lora_tensors": last["trainable_tensors"],
        "zero_grad_tensors_last_step": last["zero_grad_tensors"],
        "zero_grad_tensors_first_step": steps[0]["zero_grad_tensors"],
        **checks,
    }
    differ = checks["weights_max_abs_diff"] > 0
    out["holds"] = bool(
        last["zero_grad_tensors"] == 0
        and checks.get("ema_unmoved_tensors", 1) == 0
        and checks["velocities_finite"]
        and (not differ or checks["student_teacher_max_abs_diff"] > checks["student_repeat_max_abs_diff"])
    )
    return out


def phase_records(work: Path, preset: str) -> dict[str, dict[str, Any]]:
    """Each phase that ran (or was skipped or killed): its record, else the measured process's own stats."""
    out = {}
    for name in PHASES:
        stem = work / "stats" / f"{preset}-{name}"
        rec = _json(stem.with_suffix(".record.json")) or _json(stem.with_suffix(".json"))
        if rec is None and name == "kill" and (work / f"kill-{preset}.json").is_file():
            rec = {"rc": -9, "killed": f"{BY_DESIGN} mid-step ({(work / f'kill-{preset}.json').read_text()})"}
        if rec is not None:
            out[name] = rec
    return out


def collect(r: Any, work: Path) -> dict[str, Any]:
    """The model's JSON entry (dopsd benchmarks/full_size/report.entry) from what is in `work`."""
    p = r.preset
    phases = phase_records(work, p)
    problems = []
    for name, rec in phases.items():
        if rec.get("partial"):
            problems.append(f"{name}: stopped before it ended ({len(rec.get('steps', []))} step(s) recorded)")
        elif rec.get("skipped"):
            problems.append(f"{name}: {rec['skipped']}")
        elif rec.get("killed") and not rec["killed"].startswith(BY_DESIGN):
            problems.append(f"{name}: {rec['killed']}")
        elif rec.get("rc") not in (0, None) and not str(rec.get("killed", "")).startswith(BY_DESIGN):
            problems.append(f"{name}: exit {rec.get('rc')} (log: {work / 'logs' / f'{p}-{name}.err'})")
    extra: dict[str, Any] = {}
    written = _json(work / "models" / f"{p}-{'tiny' if r.tiny else 'full'}" / "WRITTEN.json")
    if written:
        root = work.resolve().parent
        for key in ("pretrained", "teacher_encoder"):  # where the folders are, relative to the checkout
            if written.get(key) and Path(written[key]).is_absolute() and Path(written[key]).is_relative_to(root):
                written[key] = str(Path(written[key]).relative_to(root))
        extra["folders"] = written
        phases.setdefault("write", {"rc": 0, "seconds": written.get("seconds")})
    pipeline = _json(work / f"pipeline-{p}.json")
    if pipeline:
        phases["pipeline"] = {"rc": 0, **pipeline, **phases.get("pipeline", {})}
    expected = [n for n in PHASES if not (n == "plan" and not r.gpu_plan)]
    missing = [n for n in expected if n not in phases]
    if missing:
        problems.append(f"did not run (or not yet): {', '.join(missing)}")
    for name, key in (("plan-cpu", "plan_cpu"), ("plan", "plan_gpu")):
        text = (work / "logs" / f"{p}-{name}.out").read_text() if (work / "logs" / f"{p}-{name}.out").is_file() else ""
        try:
            extra[key] = json.loads(text[text.index("{") :])
        except ValueError:
            pass
    if "train" in phases and phases["train"].get("rc") == 0:
        extra["invariants"] = invariants(phases["train"])
        if not extra["invariants"]["holds"]:
            problems.append(f"a learning invariant does not hold: {extra['invariants']}")
    if "resume" in phases and phases["resume"].get("rc") == 0:
        a, b = work / "runs" / f"{p}-A", work / "runs" / f"{p}-B"
        kept = work / "stats" / f"{p}-bit-exact.json"  # the comparison outlives the checkpoints (disk is scarce)
        ck = a / "checkpoints" / f"step-{r.steps:07d}"
        if ck.is_dir() or not kept.is_file():
            exact = resumed_bit_exact(a, b, r.steps)
            kept.write_text(json.dumps(exact, indent=2))
        else:
            exact = json.loads(kept.read_text())
        extra["resumed_files"], extra["resumed_bit_exact"] = exact, all(exact.values())
        if not extra["resumed_bit_exact"]:
            problems.append(f"the resumed run differs from the uninterrupted one: {exact}")
    if (work / f"{p}.yaml").is_file():  # what the run used (not what the code would write now)
        import yaml

        extra["config"] = yaml.safe_load((work / f"{p}.yaml").read_text())
    extra["problems"] = problems
    return {**report.entry(r, phases, extra), "date": date.today().isoformat()}
