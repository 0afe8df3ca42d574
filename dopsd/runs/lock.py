"""Taking a run folder: the checks before a start (`plan`: nothing written), the first writes (`claim`: create,
or move an earlier run aside, and lock), and the locks a running run holds. The folder's layout: dopsd.runs.folder.

A folder is running when its owner lock is held (`is_running`). Locks are flock(2) locks: the kernel drops them
when the holding process dies, so a killed run never blocks its folder, while any of its processes still alive
does. Every process of a run holds the workers lock (shared); a start needs it exclusively, so workers of an
earlier run that outlived their launcher block a new start instead of writing into it.

Changing an existing folder: `--overwrite` only ever moves a dopsd run folder aside (to a sibling
`NAME.replaced-YYYYmmdd-HHMMSS`), never deletes, and never a folder that holds the dataset, the feature cache,
the model folders or the working directory. Nothing is written before the trainer's setup has succeeded.
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
from typing import Any, Callable

from dopsd.data.cache import default_cache_dir
from dopsd.errors import CheckpointError, RunFolderError
from dopsd.files import fsync_dir
from dopsd.runs.checkpoint import list_checkpoints
from dopsd.runs.folder import (
    CHECKPOINTS,
    CONFIG,
    KNOWN,
    MARKER,
    OWNER_LOCK,
    REPLACED,
    WORKERS_LOCK,
    OutputExistsError,
    is_run_folder,
    read_marker,
    write_marker,
)

LOCK_WAIT_S = 3.0  # a momentary probe (`is_running`, another start's check) must not make a start fail


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
    found = [
        ("data.path", cfg.data.path),
        ("data.source_dir", cfg.data.source_dir),
        ("model.pretrained", cfg.model.pretrained),
        ("model.teacher_encoder", cfg.model.teacher_encoder),
    ]
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
            raise CheckpointError(
                f"--resume: {out / CHECKPOINTS} holds no complete checkpoint; start a new run (without --resume)"
            )
        return Plan(out, "resume")
    if not out.exists() or not [n for n in out.iterdir() if n.name not in (OWNER_LOCK, WORKERS_LOCK)]:
        check_cache_outside(cfg, out)
        return Plan(out, "new")
    if not overwrite:
        raise OutputExistsError(
            f"output folder {out} already exists and is not empty; choose another train.output_dir, "
            "pass --overwrite (overwrite=True) to move the earlier run aside and start anew, or "
            "--resume to continue it"
        )
    if not is_run_folder(out):
        strange = sorted(p.name for p in out.iterdir() if p.name not in KNOWN)[:5]
        raise RunFolderError(
            f"--overwrite: {out} is not a dopsd run folder (no {MARKER}"
            + (f"; it holds {', '.join(strange)}" if strange else "")
            + "), so dopsd leaves it alone; "
            "move it away yourself or choose another train.output_dir"
        )
    real = out.resolve()
    for name, path in protected_paths(cfg):
        if _covers(real, path):
            raise RunFolderError(
                f"--overwrite: {out} is or contains {name} ({path}); dopsd never moves it. "
                "Choose another train.output_dir"
            )
    check_cache_outside(cfg, out)
    check_not_in_use(out)
    return Plan(out, "replace")


def check_cache_outside(cfg: Any, out: Path) -> None:
    """Features are built before the folder is claimed: a cache inside the run folder (existing yet or not) would
    fill a new folder before its checks, or move aside with the run --overwrite replaces."""
    if not cfg.cache.enabled:
        return
    cache = Path(cfg.cache.dir or default_cache_dir()).expanduser().resolve()
    if _covers(out.resolve(), cache):
        raise RunFolderError(
            f"the feature cache (cache.dir {cache}) is inside train.output_dir {out}; the cache is shared by runs and "
            "must not live in one: set cache.dir to a folder outside the run folder, or leave it empty for the default"
        )


# --- locks ----------------------------------------------------------------------------------------------
def _try_lock(fd: int, mode: int, wait: float = LOCK_WAIT_S) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(
                    f"cannot lock a file in the run folder ({err}); put train.output_dir on a local "
                    "file system that supports flock"
                ) from None
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
    return RunFolderError(
        f"{folder} is in use by another dopsd process{_holder(folder)}; wait for it to finish or "
        "stop it, then start again"
    )


def _orphans(folder: Path) -> RunFolderError:
    return RunFolderError(
        f"processes of an earlier run are still working in {folder} (e.g. torchrun workers left running after the "
        f"launcher was killed); list them with `fuser -v {folder / WORKERS_LOCK}` (or `lsof` on that file), stop "
        "them, then start again"
    )


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
                raise RunFolderError(
                    f"output folder {p.out} was filled by another process while this run started "
                    f"({', '.join(sorted(others)[:3])}); choose another train.output_dir"
                )
        if read_marker(p.out) is None:
            write_marker(p.out)  # a new folder, or an old dopsd run adopted on resume
    except BaseException:
        lock.release()
        raise
    return lock, aside


def claim_all(
    p: Plan, *, main: bool, share: Callable[[Any], Any], barrier: Callable[[], None], seen: list[str] | None = None
) -> tuple[RunLock, Path | None]:
    """Every process of a run takes the folder, all or none: the main process claims it, the others then join its
    lock. `share(value)` gives every process the main process's value; `seen`: the checkpoints a resuming trainer
    found when it read one (a resume by another process meanwhile would make this run's checkpoint stale)."""
    lock, aside, failure = None, None, None
    if main:
        try:
            lock, aside = claim(p)
            now = [c.name for c in list_checkpoints(p.out / CHECKPOINTS)]
            if p.mode == "resume" and seen is not None and seen != now:
                raise RunFolderError(
                    f"the checkpoints in {p.out} changed while this run started (another process "
                    "resumed it meanwhile?); start again"
                )
        except BaseException as err:  # noqa: BLE001 - every process must learn that the claim failed
            if lock is not None:
                lock.release()
            failure = err
    message = share(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise RunFolderError(message)
    if not main:
        lock = join(p.out)
    barrier()
    assert lock is not None
    return lock, aside
