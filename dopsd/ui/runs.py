"""Read a run folder as `dopsd train` leaves it (see dopsd/training/api.py): progress, losses, few-step health, sample
grids, summary. Newer files are used when present, with fallbacks for folders written before them:

  progress.json  {step, max_steps, status, started, updated, eta_seconds, pid}  else: losses.jsonl + config.yaml
  health.jsonl   one record per sampling interval (step, health, warning, …)    else: TensorBoard logs (logs/)
  done.jsonl     the done signal per sampling interval (step, distance, best_step, as_good_step)  else: none
  summary.json   `status` ("ok" / "unhealthy" / "aborted")                       else: "ok" when summary.json exists
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

SAMPLE_RE = re.compile(r"^(step-(\d+)|final)_(\d+)steps\.png$")
HEALTH_WARNING_RE = re.compile(r"step (\d+): (few-step health ([0-9.]+) < ([0-9.]+).*)")
MAX_POINTS = 400


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line (a line being written right now is skipped)."""
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_config(run: Path) -> dict[str, Any]:
    return read_config_file(run / "config.yaml")


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file as a plain dict ({} when missing or not YAML)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def thin(records: list[dict[str, Any]], n: int = MAX_POINTS) -> list[dict[str, Any]]:
    if len(records) <= n:
        return records
    stride = len(records) / n
    picked = [records[int(i * stride)] for i in range(n)]
    return picked[:-1] + [records[-1]]


def pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.is_file():
        try:
            return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True


def losses(run: Path) -> list[dict[str, Any]]:
    """Per-step records for the loss curve: step, loss, lr, grad_norm and the per-term losses (no roll-out detail)."""
    keep = []
    for r in read_jsonl(run / "losses.jsonl"):
        if isinstance(r.get("step"), int):
            keep.append(
                {
                    k: v
                    for k, v in r.items()
                    if not k.startswith("rollout/") and (isinstance(v, (int, float)) or k == "skipped")
                }
            )
    return keep


def samples(run: Path) -> dict[str, Any]:
    """The sample grids: every (tag, steps) with its step, and the latest at the few-step and many-step setting."""
    found = []
    folder = run / "samples"
    if folder.is_dir():
        for p in folder.iterdir():
            m = SAMPLE_RE.match(p.name)
            if m:
                step = None if m.group(1) == "final" else int(m.group(2))
                found.append({"file": p.name, "tag": m.group(1), "step": step, "steps": int(m.group(3))})
    counts = sorted({s["steps"] for s in found})
    few = counts[0] if counts else None
    many = counts[-1] if len(counts) > 1 else None
    order = lambda s: (s["step"] is None, s["step"] or 0)  # noqa: E731 - "final" after every step
    found.sort(key=order)
    latest = {}
    for key, k in (("few", few), ("many", many)):
        of_k = [s for s in found if s["steps"] == k]
        latest[key] = of_k[-1] if of_k else None
    return {"grids": found, "few_steps": few, "many_steps": many, "latest": latest}


def health_from_tensorboard(run: Path) -> list[dict[str, Any]]:
    """health/* scalars from the run's TensorBoard logs, one record per step."""
    logs = run / "logs"
    if not logs.is_dir() or not any(logs.iterdir()):
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs), size_guidance={"scalars": 0, "images": 1, "tensors": 1, "histograms": 1})
    try:
        acc.Reload()
    except Exception:  # noqa: BLE001 - a log being written may be cut mid-record; nothing to show yet
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for tag in acc.Tags().get("scalars", []):
        if not tag.startswith("health/") or tag.startswith(("health/raw/", "health/start/")):
            continue
        for event in acc.Scalars(tag):
            by_step.setdefault(event.step, {"step": event.step})[tag.removeprefix("health/")] = event.value
    return [by_step[s] for s in sorted(by_step)]


class HealthCache:
    """TensorBoard parsing is slow-ish: parse again only when the logs folder changed."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, list[dict[str, Any]]]] = {}

    def get(self, run: Path) -> list[dict[str, Any]]:
        logs = run / "logs"
        try:
            stamp = max((p.stat().st_mtime_ns + p.stat().st_size for p in logs.iterdir()), default=0)
        except OSError:
            return []
        hit = self._cache.get(str(run))
        if hit and hit[0] == stamp:
            return hit[1]
        records = health_from_tensorboard(run)
        self._cache[str(run)] = (stamp, records)
        return records


def health(run: Path, cache: HealthCache, log_text: str = "") -> dict[str, Any]:
    """Few-step health records and the latest alarm, from health.jsonl or (older runs) TensorBoard + the log."""
    records = read_jsonl(run / "health.jsonl")
    source = "health.jsonl"
    note = None
    if not records:
        records = cache.get(run)
        source = "tensorboard" if records else None
        note = (
            (
                "health.jsonl not written by this dopsd version: health read from the TensorBoard logs; "
                "alarms only from the job's output"
            )
            if records
            else "no few-step health recorded (yet)"
        )
    threshold = next(
        (r.get("threshold") for r in reversed(records) if isinstance(r.get("threshold"), (int, float))), None
    )
    warning = next(
        ({"step": r.get("step"), "message": r["warning"]} for r in reversed(records) if r.get("warning")), None
    )
    if warning is None and log_text:
        found = HEALTH_WARNING_RE.findall(log_text)
        if found:
            step, message, _, limit = found[-1]
            warning = {"step": int(step), "message": message}
            threshold = threshold or float(limit)
    return {"records": thin(records), "source": source, "note": note, "warning": warning, "threshold": threshold}


def done_signal(run: Path) -> dict[str, Any] | None:
    """The done signal (done.jsonl: dopsd.training.done) per sampling, and its latest reading: the lowest step and
    the earliest step as good as it. None for a run without one (off, or written before it existed)."""
    records = [r for r in read_jsonl(run / "done.jsonl") if isinstance(r.get("distance"), (int, float))]
    if not records:
        return None
    last = records[-1]
    return {
        "records": thin([{"step": r["step"], "distance": r["distance"]} for r in records]),
        "best_step": last.get("best_step"),
        "best": last.get("best"),
        "as_good_step": last.get("as_good_step", last.get("best_step")),
        "features": last.get("features"),
    }


def progress(
    run: Path, cfg: dict[str, Any], records: list[dict[str, Any]], seen: dict[str, Any] | None
) -> dict[str, Any]:
    """step / max_steps / eta: progress.json when the trainer writes it, else the loss trace, with the rate measured
    between the first time the app saw this job's run (`seen`: {"time", "step"}, kept by the caller) and now."""
    data = read_json(run / "progress.json")
    if isinstance(data, dict) and isinstance(data.get("step"), int):
        return {**data, "source": "progress.json"}
    max_steps = (cfg.get("train") or {}).get("max_steps")
    step = records[-1]["step"] if records else 0
    eta = None
    if seen is not None:
        seen.setdefault("time", time.time())
        seen.setdefault("step", step)
        done, elapsed = step - seen["step"], time.time() - seen["time"]
        if done > 0 and elapsed > 0 and isinstance(max_steps, int):
            eta = max(0.0, (max_steps - step) * elapsed / done)
    return {"step": step, "max_steps": max_steps, "eta_seconds": eta, "source": "losses.jsonl"}


def status(run: Path, running: bool) -> str:
    """running / ok / unhealthy / aborted / stopped (no summary: interrupted or still starting) / empty."""
    summary = read_json(run / "summary.json")
    prog = read_json(run / "progress.json")
    if running or (isinstance(prog, dict) and prog.get("status") == "running" and pid_alive(prog.get("pid"))):
        return "running"
    if isinstance(summary, dict):
        return str(summary.get("status") or "ok")
    if not (run / "config.yaml").is_file():
        return "empty"
    return "stopped"


def checkpoints(run: Path) -> list[str]:
    folder = run / "checkpoints"
    return (
        sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")) if folder.is_dir() else []
    )


def resumable(run: Path, running: bool) -> bool:
    """A run that did not finish (or was aborted) and has a checkpoint: `dopsd train RUN/config.yaml --resume`."""
    return bool(checkpoints(run)) and status(run, running) in ("stopped", "aborted")


def summarize(run: Path, running: bool) -> dict[str, Any]:
    """What the run list shows."""
    cfg = read_config(run)
    records = read_jsonl(run / "losses.jsonl")
    last = records[-1] if records else {}
    prog = read_json(run / "progress.json")
    max_steps = prog.get("max_steps") if isinstance(prog, dict) else (cfg.get("train") or {}).get("max_steps")
    return {
        "name": run.name,
        "status": status(run, running),
        "method": (cfg.get("method") or {}).get("name"),
        "family": (cfg.get("model") or {}).get("family"),
        "preset": cfg.get("preset"),
        "step": prog.get("step") if isinstance(prog, dict) else last.get("step", 0),
        "max_steps": max_steps,
        "loss": last.get("loss"),
        "modified": _mtime(run),
        "has_lora": (run / "lora.safetensors").is_file(),
        "resumable": resumable(run, running),
    }


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
