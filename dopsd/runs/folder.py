"""The run folder (`train.output_dir`): what is in it, its file names and formats, and the files a run writes.
Who may start or run in a folder (the checks, the first writes, the locks): dopsd.runs.lock.

Layout (what a web UI or script may read):
  dopsd-run.json         marker, written when dopsd creates (or adopts) the folder:
                         {"format": "dopsd-run", "version": 1, "created": ISO time, "dopsd": version}
  .dopsd-owner.lock      held exclusively (flock) by the run's main process while it runs; holds its pid/host
  .dopsd-workers.lock    held shared (flock) by every process of the run (all torchrun workers) while it runs
  config.yaml            the resolved config of the run (of its latest session)
  losses.jsonl           one JSON record per optimizer step (appended; a killed run may leave a partial last line):
                         step, loss, each term's loss, lr, grad_norm, skipped, rollout/stepK_{loss,gap,sigma}
                         (of the roll-out states trained that step: method.train_states)
  progress.json          while a session runs (rewritten atomically at most about once a second, and at every
                         checkpoint and sampling interval): {"step", "max_steps", "status": "running" | "ok" |
                         "unhealthy" | "aborted" | "interrupted" (stopped by a signal after a checkpoint),
                         "started", "updated" (ISO times), "eta_seconds" (null until a step of this session is
                         done), "pid" (the main process)}; "running" with a pid that is no longer alive means the
                         run was killed
  done.jsonl             one JSON record per done-signal measurement (dopsd.training.done; at each sampling): step,
                         distance (samples to their training images), best_step, best, features, samples
  health.jsonl           one JSON record per few-step health measurement (dopsd.training.health; at each sampling interval
                         and at the end): step, health, its component scores (sharpness, structure, and gap /
                         quality where measured), sharpness_ratio, broken, problem, warning (text or null) and
                         threshold (the warning level)
  summary.json           written when a session ends: what was trained, with `status` "ok" | "unhealthy" | "aborted"
  checkpoints/step-NNNNNNN/   resumable state (dopsd.runs.checkpoint), the last train.keep_checkpoints kept
  logs/                  TensorBoard
  samples/               grids {tag}_{K}steps.png, tag step-NNNNNNN or final, K the few-step setting and the
                         many-step control (sample.control_steps); grid.json: {"prompts", "seeds"}, the grids'
                         rows and columns
  eval/                  `dopsd eval` results
  lora.safetensors + lora_config.json   the LoRA and what `dopsd sample` needs to load it (dopsd.lora.trained);
                         for Z-Image / FLUX.2 in the layout diffusers (`pipe.load_lora_weights(run_folder)`) and
                         ComfyUI load; its metadata names the method, steps, trigger word and the run (title)
  model.safetensors      instead of the LoRA for a full fine-tune

A folder is running when its owner lock is held (`dopsd.runs.lock.is_running`). No summary.json and not running:
the run was stopped (killed, crashed) and `--resume` continues it.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import yaml

from dopsd.config import ConfigError, as_before_the_options, load_config
from dopsd.errors import RunFolderError
from dopsd.files import atomic_write_json, atomic_write_text, replace_and_keep_open
from dopsd.lora.meta import RUN_SUMMARY
from dopsd.lora.meta import STATUS_ABORTED as STATUS_ABORTED  # re-exported: the run statuses, all named here
from dopsd.lora.meta import STATUS_UNHEALTHY as STATUS_UNHEALTHY
from dopsd.version import __version__

MARKER = "dopsd-run.json"
MARKER_FORMAT, MARKER_VERSION = "dopsd-run", 1
OWNER_LOCK, WORKERS_LOCK = ".dopsd-owner.lock", ".dopsd-workers.lock"
CONFIG, LOSSES, SUMMARY = "config.yaml", "losses.jsonl", RUN_SUMMARY
PROGRESS, HEALTH = "progress.json", "health.jsonl"
DONE = "done.jsonl"  # the done signal's trace (dopsd.training.done)
CHECKPOINTS, LOGS, SAMPLES = "checkpoints", "logs", "samples"
STATUS_OK, STATUS_RUNNING = "ok", "running"
STATUS_INTERRUPTED = "interrupted"  # progress.json only: stopped by a signal after a checkpoint
REPLACED = ".replaced-"
# Everything earlier dopsd versions wrote at the top of a run folder: a folder without the marker is taken for
# an old run only if it holds nothing else (see `legacy_run`).
KNOWN = {
    CONFIG,
    LOSSES,
    SUMMARY,
    PROGRESS,
    HEALTH,
    DONE,
    CHECKPOINTS,
    LOGS,
    SAMPLES,
    "eval",
    "lora.safetensors",
    "lora_config.json",
    "model.safetensors",
    "pytorch_lora_weights.safetensors",
    MARKER,
    OWNER_LOCK,
    WORKERS_LOCK,
}
# Keys that may change when resuming (extend a run, sample more often, …); anything else must match. The batch
# keys may change as long as the global batch stays the same (checked against the checkpoint).
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_nonfinite",
    "train.output_dir",
    "train.device",
    "train.batch_size",
    "train.gradient_accumulation",
    "train.fsdp",  # how the processes hold the weights; checkpoints hold whole tensors either way
    "train.gradient_checkpointing",  # speed and memory only (auto resolves per machine); the same gradients
    "train.compile",
    "sample.",
    "log.",
    "cache.",
)


class OutputExistsError(RunFolderError, FileExistsError):
    """train.output_dir already holds something and neither --resume nor --overwrite was given."""


# --- what a folder is ------------------------------------------------------------------------------
def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def legacy_run(folder: Path) -> bool:
    """A run folder of a dopsd version before the marker: a dopsd config.yaml, a trace of training (checkpoints/,
    summary.json or losses.jsonl) and nothing dopsd did not write. Anything else is not ours to move."""
    import yaml

    try:
        config = yaml.safe_load((folder / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return False
    if not (isinstance(config, dict) and {"model", "data", "train"} <= set(config)):
        return False
    names = {p.name for p in folder.iterdir()}
    return bool(names & {CHECKPOINTS, SUMMARY, LOSSES}) and names <= KNOWN


def is_run_folder(folder: Path) -> bool:
    return folder.is_dir() and (read_marker(folder) is not None or legacy_run(folder))


def write_marker(out: Path) -> None:
    atomic_write_json(
        out / MARKER,
        {
            "format": MARKER_FORMAT,
            "version": MARKER_VERSION,
            "created": datetime.now().isoformat(timespec="seconds"),
            "dopsd": __version__,
        },
    )


# --- the run's files ------------------------------------------------------------------------------------
def write_config(out: Path, config_yaml: str) -> None:
    atomic_write_text(out / CONFIG, config_yaml)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("fsdp",):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(config: Any, out: Path) -> None:
    """--resume: refuse a config that differs from the run's config.yaml beyond RESUMABLE_CHANGES. Options the
    run's config.yaml does not name take the value that reproduces the run as it began (declared in the schema,
    opt(before=...)): a resume continues the run it began, not a newer default (one roll-out state instead of all)."""
    saved = _flat(yaml.safe_load((out / CONFIG).read_text()) or {})
    before = as_before_the_options()
    for key, value in before.items():
        section, name = key.split(".")
        if key not in saved and getattr(getattr(config, section), name) != value:
            print(f"[dopsd] --resume: the run began before {key} existed; it continues with {key}={value}")
            setattr(getattr(config, section), name, value)
    old, new = _flat(load_config(out / CONFIG).to_dict()), _flat(config.to_dict())
    old.update({k: v for k, v in before.items() if k not in saved})
    changed = [k for k in new if old.get(k) != new[k] and not k.startswith(RESUMABLE_CHANGES) and k != "data.path"]
    if changed:
        raise ConfigError(
            f"--resume: the config differs from the run's config.yaml in {', '.join(changed)}; "
            "resume with the same settings (only train.max_steps, sampling and logging may change)"
        )


def sample_grid(out: Path, tag: str, steps: int) -> Path:
    return out / SAMPLES / f"{tag}_{steps}steps.png"


def sample_layout(out: Path) -> Path:
    """samples/grid.json: {"prompts": [...], "seeds": [...]}, the rows and the columns of every sample grid."""
    return out / SAMPLES / "grid.json"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file that have a step (a partial or broken line, e.g. from a kill, is skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        records.append(record)
    return records


class Trace:
    """A JSON-lines trace (losses.jsonl, health.jsonl) held open by its one writer, the main process, for a whole
    session. It starts as a fresh file holding exactly `records` (written beside the old one, synced, renamed over
    it), and every later line goes through the same open file in order, flushed as one write: a kill leaves at
    worst a partial last line, which readers skip. One handle serves the restart and the appends, so no line
    goes through a second open of the file by name."""

    def __init__(self, path: Path, records: Iterable[dict[str, Any]]):
        self.fh = replace_and_keep_open(path, "".join(json.dumps(r) + "\n" for r in records))

    def append(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def sync(self) -> None:
        """Make the trace durable up to now (at every checkpoint)."""
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


def read_losses(out: Path) -> dict[int, dict[str, Any]]:
    """The step records in losses.jsonl by step."""
    return {int(r["step"]): r for r in _read_jsonl(out / LOSSES)}


def open_losses(out: Path, history: Iterable[dict[str, Any]]) -> Trace:
    """losses.jsonl restarted at exactly the steps in `history` (a resumed run's checkpoint; a killed run may have
    logged further): the earlier file's full records (with their per-step diagnostics) where they agree with the
    checkpoint, else the checkpoint's."""
    old = read_losses(out)
    records = []
    for record in history:
        kept = old.get(int(record["step"]))
        same = kept is not None and all(json.dumps(kept.get(k)) == json.dumps(v) for k, v in record.items())
        records.append(kept if same else record)
    return Trace(out / LOSSES, records)


def open_health(out: Path, step: int) -> Trace:
    """health.jsonl keeping the measurements up to the checkpoint's `step` (a killed run may have measured further)."""
    return Trace(out / HEALTH, [r for r in _read_jsonl(out / HEALTH) if int(r["step"]) <= step])


def read_done(out: Path, step: int) -> list[dict[str, Any]]:
    """done.jsonl's measurements up to the checkpoint's `step` (a killed run may have measured further)."""
    return [r for r in _read_jsonl(out / DONE) if int(r["step"]) <= step and isinstance(r.get("distance"), float)]


def health_record(step: int, measured: dict[str, Any], threshold: float) -> dict[str, Any]:
    """One few-step health measurement (dopsd.training.health's result, without its raw and starting values)."""
    return {
        "step": step,
        **{k: v for k, v in measured.items() if not k.startswith(("raw/", "start/"))},
        "threshold": threshold,
    }


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def write_progress(out: Path, progress: dict[str, Any]) -> None:
    atomic_write_json(out / PROGRESS, progress)


# --- the end of a session: summary.json (what it holds: dopsd.training.summary) ---------------------------------
def write_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(out / SUMMARY, summary)


def format_summary(s: dict[str, Any]) -> str:
    """What `dopsd train` prints at the end."""
    lines = [
        f"status: {s['status']}" + (f" ({s['problem']})" if s.get("problem") else ""),
        f"trained: {s['what']}",
        f"data: {s['data']['images']} images from {s['data']['path']}",
        f"steps: {s['steps']} (this run {s['steps_this_run']}, global batch {s['global_batch']}, "
        f"{s['processes']} process(es) on {s['device']}) in {s['seconds_total']:.1f} s",
        f"loss: {s['first_loss']:.4g} -> {s['final_loss']:.4g}" if s["final_loss"] is not None else "loss: -",
        f"weights: {s['weights']}",
    ]
    if s["skipped_steps"]:
        lines.append(f"skipped steps (non-finite): {s['skipped_steps']}")
    if done := s.get("done"):  # the done signal (dopsd.training.done): its lowest step, an early stop
        stop = f"; stopped early at step {done['last_step']}" if done["stopped_early"] else ""
        as_good = done.get("as_good_step", done["best_step"])
        early = f"; as good from step {as_good}" if as_good != done["best_step"] else ""
        lines.append(f"done signal: lowest at step {done['best_step']} ({done['best_distance']:.4g}){early}{stop}")
    lines += [f"samples: {v}" for v in s["samples"].values()]
    return "\n".join(lines)
