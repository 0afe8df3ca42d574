"""The run folder (`train.output_dir`): its file names, the marker that says dopsd made it, the locks a running
run holds, and the only ways dopsd changes an existing folder.

Layout (what a web UI or script may read):
  dopsd-run.json         marker, written when dopsd creates (or adopts) the folder:
                         {"format": "dopsd-run", "version": 1, "created": ISO time, "dopsd": version}
  .dopsd-owner.lock      held exclusively (flock) by the run's main process while it runs; holds its pid/host
  .dopsd-workers.lock    held shared (flock) by every process of the run (all torchrun workers) while it runs
  config.yaml            the resolved config of the run (of its latest session)
  losses.jsonl           one JSON record per optimizer step (appended; a killed run may leave a partial last line)
  summary.json           written when a session ends: what was trained, with `status` "ok" | "unhealthy" | "aborted"
  checkpoints/step-NNNNNNN/   resumable state (dopsd.checkpoint)
  logs/ samples/ eval/   TensorBoard, sample grids, `dopsd eval` results
  lora.safetensors + lora_config.json (or model.safetensors), pytorch_lora_weights.safetensors   final weights

A folder is running when its owner lock is held (`is_running`). No summary.json and not running: the run was
stopped (killed, crashed) and `--resume` continues it. Locks are flock(2) locks: the kernel drops them when the
holding process dies, so a killed run never blocks its folder, while any of its processes still alive does.

Changing an existing folder: `--overwrite` only ever moves a dopsd run folder aside (to a sibling
`NAME.replaced-YYYYmmdd-HHMMSS`), never deletes, and never a folder that holds the dataset, the feature cache,
the model folders or the working directory. Nothing is written before the trainer's setup has succeeded
(`plan` only looks; `claim` acts).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from dopsd.checkpoint import list_checkpoints
from dopsd.errors import CheckpointError, RunFolderError
from dopsd.files import atomic_write_json, atomic_write_text, fsync_dir

MARKER = "dopsd-run.json"
MARKER_FORMAT, MARKER_VERSION = "dopsd-run", 1
OWNER_LOCK, WORKERS_LOCK = ".dopsd-owner.lock", ".dopsd-workers.lock"
CONFIG, LOSSES, SUMMARY = "config.yaml", "losses.jsonl", "summary.json"
CHECKPOINTS, LOGS, SAMPLES = "checkpoints", "logs", "samples"
STATUS_OK, STATUS_UNHEALTHY, STATUS_ABORTED = "ok", "unhealthy", "aborted"
REPLACED = ".replaced-"
# Everything earlier dopsd versions wrote at the top of a run folder: a folder without the marker is taken for
# an old run only if it holds nothing else (see `legacy_run`).
KNOWN = {CONFIG, LOSSES, SUMMARY, CHECKPOINTS, LOGS, SAMPLES, "eval", "lora.safetensors", "lora_config.json",
         "model.safetensors", "pytorch_lora_weights.safetensors", MARKER, OWNER_LOCK, WORKERS_LOCK}
LOCK_WAIT_S = 3.0  # a momentary probe (`is_running`, another start's check) must not make a start fail


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


def is_running(folder: Path) -> bool:
    """True while a dopsd process runs in `folder` (probes the owner lock without keeping it)."""
    path = Path(folder) / OWNER_LOCK
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# --- plan: every check, nothing written -------------------------------------------------------------
@dataclass
class Plan:
    out: Path
    mode: str  # "new" (create or use an empty folder), "resume", "replace" (move the old run aside first)


def protected_paths(cfg: Any) -> list[tuple[str, Path]]:
    """Folders a run folder must never be (or contain): the data, the feature cache, the model, the cwd."""
    from dopsd.cache import default_cache_dir

    found = [("data.path", cfg.data.path), ("data.source_dir", cfg.data.source_dir),
             ("model.pretrained", cfg.model.pretrained), ("model.teacher_encoder", cfg.model.teacher_encoder)]
    if cfg.cache.enabled:
        found.append(("the feature cache (cache.dir)", cfg.cache.dir or default_cache_dir()))
    found.append(("the current directory", Path.cwd()))
    out = []
    for name, value in found:
        if value and Path(value).expanduser().exists():  # model names like 'turbo' are not paths
            out.append((name, Path(value).expanduser().resolve()))
    return out


def _covers(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def plan(cfg: Any, *, resume: bool, overwrite: bool) -> Plan:
    """Decide what starting this run does to `train.output_dir`; raise RunFolderError if it may not."""
    out = Path(cfg.train.output_dir).expanduser()
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in train.output_dir and --overwrite replaces it; pass one")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"train.output_dir {out} is a file, not a folder; choose another train.output_dir")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if not out.exists() and (parent is None or not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise RunFolderError(f"train.output_dir {out} cannot be created ({parent} is not a writable folder)")
    if resume:
        if not out.is_dir() or not (out / CONFIG).is_file():
            raise RunFolderError(f"--resume: {out} is not a dopsd run folder (no {CONFIG}); check train.output_dir")
        check_not_in_use(out)
        if not list_checkpoints(out / CHECKPOINTS):  # said before the dataset and the model are read
            raise CheckpointError(f"--resume: {out / CHECKPOINTS} holds no complete checkpoint; start a new run "
                                  "(without --resume)")
        return Plan(out, "resume")
    if not out.exists() or not [n for n in out.iterdir() if n.name not in (OWNER_LOCK, WORKERS_LOCK)]:
        return Plan(out, "new")
    if not overwrite:
        raise OutputExistsError(f"output folder {out} already exists and is not empty; choose another train.output_dir, "
                             "pass --overwrite (overwrite=True) to move the earlier run aside and start anew, or "
                             "--resume to continue it")
    if not is_run_folder(out):
        strange = sorted(p.name for p in out.iterdir() if p.name not in KNOWN)[:5]
        raise RunFolderError(
            f"--overwrite: {out} is not a dopsd run folder (no {MARKER}"
            + (f"; it holds {', '.join(strange)}" if strange else "") + "), so dopsd leaves it alone; "
            "move it away yourself or choose another train.output_dir")
    real = out.resolve()
    for name, path in protected_paths(cfg):
        if _covers(real, path):
            raise RunFolderError(f"--overwrite: {out} is or contains {name} ({path}); dopsd never moves it. "
                                 "Choose another train.output_dir")
    check_not_in_use(out)
    return Plan(out, "replace")


# --- locks ----------------------------------------------------------------------------------------------
def _try_lock(fd: int, mode: int, wait: float = LOCK_WAIT_S) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"cannot lock a file in the run folder ({err}); put train.output_dir on a local "
                                     "file system that supports flock") from None
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _holder(folder: Path) -> str:
    try:
        info = json.loads((folder / OWNER_LOCK).read_text())
        return f" (pid {info['pid']} on {info['host']}, since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _in_use(folder: Path) -> RunFolderError:
    return RunFolderError(f"{folder} is in use by another dopsd process{_holder(folder)}; wait for it to finish or "
                          "stop it, then start again")


def _orphans(folder: Path) -> RunFolderError:
    return RunFolderError(
        f"processes of an earlier run are still working in {folder} (e.g. torchrun workers left running after the "
        f"launcher was killed); list them with `fuser -v {folder / WORKERS_LOCK}` (or `lsof` on that file), stop "
        "them, then start again")


def check_not_in_use(folder: Path) -> None:
    """Refuse early (holding nothing) if a run or workers of an earlier run are alive in `folder`."""
    for name, mode, error in ((OWNER_LOCK, fcntl.LOCK_SH, _in_use), (WORKERS_LOCK, fcntl.LOCK_EX, _orphans)):
        path = folder / name
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            if not _try_lock(fd, mode, wait=0.2):
                raise error(folder)
        finally:
            os.close(fd)


@dataclass
class RunLock:
    """The locks one process of a running run holds (released by `release` or when the process ends)."""

    folder: Path
    fds: list[int] = field(default_factory=list)

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)  # closing the last descriptor drops the flock
        self.fds.clear()


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def lock_as_owner(folder: Path, record: bool = True) -> RunLock:
    """The main process: the owner lock (exclusive), then proof that no worker of an earlier run is alive
    (the workers lock exclusively), kept as a shared hold like every other process of this run. `record`: write
    this process's pid/host into the owner lock (for the message another start shows)."""
    lock = RunLock(folder)
    owner = _open(folder / OWNER_LOCK)
    if not _try_lock(owner, fcntl.LOCK_EX):
        os.close(owner)
        raise _in_use(folder)
    lock.fds.append(owner)
    if record:
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat()})
        os.ftruncate(owner, 0)
        os.pwrite(owner, info.encode(), 0)
    workers = _open(folder / WORKERS_LOCK)
    lock.fds.append(workers)
    # Only one starter can hold the owner lock, so no other start can slip in between these two calls.
    if not _try_lock(workers, fcntl.LOCK_EX):
        lock.release()
        raise _orphans(folder)
    fcntl.flock(workers, fcntl.LOCK_SH)
    return lock


def join(folder: Path) -> RunLock:
    """Every other process of the run (DDP ranks > 0): a shared hold on the workers lock."""
    fd = _open(folder / WORKERS_LOCK)
    if not _try_lock(fd, fcntl.LOCK_SH, wait=30.0):
        os.close(fd)
        raise _orphans(folder)
    return RunLock(folder, [fd])


# --- claim: the first writes, after every check passed -------------------------------------------------
def _aside_name(out: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = out.with_name(f"{out.name}{REPLACED}{stamp}"), 1
    while candidate.exists():
        n += 1
        candidate = out.with_name(f"{out.name}{REPLACED}{stamp}-{n}")
    return candidate


def move_aside(out: Path) -> Path:
    """Rename the run folder `out` to a new sibling (while holding its locks, so nothing runs in it)."""
    old = lock_as_owner(out, record=False)
    try:
        aside = _aside_name(out)
        os.rename(out, aside)
        fsync_dir(out.absolute().parent)
    finally:
        old.release()
    return aside


def write_marker(out: Path) -> None:
    from dopsd import __version__

    atomic_write_json(out / MARKER, {"format": MARKER_FORMAT, "version": MARKER_VERSION,
                                     "created": datetime.now().isoformat(timespec="seconds"), "dopsd": __version__})


def claim(p: Plan) -> tuple[RunLock, Path | None]:
    """The main process takes the folder for this run: returns its lock and where an earlier run was moved."""
    aside = move_aside(p.out) if p.mode == "replace" else None
    try:
        p.out.mkdir(parents=True, exist_ok=True)
        lock = lock_as_owner(p.out)
    except RunFolderError as err:
        if aside is None:
            raise
        raise RunFolderError(f"{err} (the earlier run there was moved aside to {aside})") from None
    try:
        if p.mode != "resume":
            others = [n.name for n in p.out.iterdir() if n.name not in (OWNER_LOCK, WORKERS_LOCK)]
            if others:  # another start took the folder between our check and now
                raise RunFolderError(f"output folder {p.out} was filled by another process while this run started "
                                     f"({', '.join(sorted(others)[:3])}); choose another train.output_dir")
        if read_marker(p.out) is None:
            write_marker(p.out)  # a new folder, or an old dopsd run adopted on resume
    except BaseException:
        lock.release()
        raise
    return lock, aside


# --- the run's files ------------------------------------------------------------------------------------
def write_config(out: Path, config_yaml: str) -> None:
    atomic_write_text(out / CONFIG, config_yaml)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(out / SUMMARY, summary)


def read_losses(out: Path) -> dict[int, dict[str, Any]]:
    """The step records in losses.jsonl by step (a partial or broken line, e.g. from a kill, is skipped)."""
    records: dict[int, dict[str, Any]] = {}
    try:
        lines = (out / LOSSES).read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
            records[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            continue
    return records


def restart_losses(out: Path, history: Iterable[dict[str, Any]]) -> None:
    """Rewrite losses.jsonl to exactly the steps in `history` (a resumed run's checkpoint): the earlier file's full
    records (with their per-step diagnostics) where they agree with the checkpoint, else the checkpoint's."""
    old = read_losses(out)
    lines = []
    for record in history:
        kept = old.get(int(record["step"]))
        same = kept is not None and all(json.dumps(kept.get(k)) == json.dumps(v) for k, v in record.items())
        lines.append(json.dumps(kept if same else record) + "\n")
    atomic_write_text(out / LOSSES, "".join(lines))


def append_loss(out: Path, record: dict[str, Any]) -> None:
    """One line, written with a single call: a kill leaves at worst a partial last line, which readers skip."""
    with open(out / LOSSES, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def sync_losses(out: Path) -> None:
    """Make the trace durable up to now (at every checkpoint)."""
    try:
        with open(out / LOSSES, "rb") as fh:
            os.fsync(fh.fileno())
    except OSError:
        pass
