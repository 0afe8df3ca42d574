"""Jobs: every command the app runs, as a separate process group, one at a time by default (a queue).

A job is a command (argument list, never a shell line) started through `dopsd.ui.runner` in a new session, with
its output in HOME/.ui/logs/ID.log and its exit status in HOME/.ui/logs/ID.rc. The records are kept in
HOME/.ui/jobs.json (written atomically on every change), so a restarted app finds them again: a job whose
process still runs (same PID and the same process start time) is adopted and watched, one whose process is gone
gets its status from the .rc file.

Stop: SIGTERM to the job's process group, then SIGKILL once `grace` seconds have passed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dopsd.ui import adapter
from dopsd.ui.home import Home

ACTIVE = ("running", "stopping")
DONE = ("succeeded", "failed", "stopped", "cancelled", "lost")
KEEP_RECORDS = 500


@dataclass
class Job:
    id: str
    kind: str  # train, resume, probe, sample, export, bench, demo, plan, …
    title: str
    argv: list[str]  # the full command: program and arguments
    target: dict[str, Any] = field(default_factory=dict)  # what it works on: {"run": NAME}, {"probe": NAME}, …
    queued: bool = True  # waits for a free slot (False: starts at once, e.g. a small export)
    status: str = "queued"  # queued, running, stopping, succeeded, failed, stopped, cancelled, lost
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    pid: int | None = None
    pid_start: str | None = None  # the process's start time (/proc), to recognise it after a restart
    returncode: int | None = None
    stop_requested: float | None = None
    message: str | None = None

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["command"] = " ".join(_shown(a) for a in self.argv)
        return d


def _shown(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_=./:,@+" for c in arg) else repr(arg)


def dopsd_command(*args: str) -> list[str]:
    """The argument list that runs `dopsd ARGS…` with this Python (the same installation as the app)."""
    return [sys.executable, "-m", "dopsd.cli", *args]


def _proc_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot) or None if it does not exist or is a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc: existence only
        except (OSError, ProcessLookupError):
            return None
        return "?"
    rest = text.rsplit(")", 1)[-1].split()
    if not rest or rest[0] == "Z":
        return None
    return rest[19] if len(rest) > 19 else "?"


class JobManager:
    def __init__(self, home: Home, max_running: int = 1, grace: float = 10.0, env: dict[str, str] | None = None):
        self.home = home
        self.max_running = max(1, int(max_running))
        self.grace = float(grace)
        self.env = dict(env or {})
        self.jobs: dict[str, Job] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.path = home.state / "jobs.json"
        self.logs = home.state / "logs"
        self._load()

    # --- persistence ----------------------------------------------------------------------------------------
    def _load(self) -> None:
        import json

        if not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            bad = self.path.with_name(f"jobs.unreadable-{int(time.time())}.json")
            os.replace(self.path, bad)  # kept for the user, never deleted
            return
        fields = set(Job.__dataclass_fields__)
        for record in data.get("jobs", []):
            job = Job(**{k: v for k, v in record.items() if k in fields})
            self.jobs[job.id] = job
        with self._lock:
            for job in self.jobs.values():
                if job.status in ACTIVE:
                    self._reconcile(job)
            self._save()

    def _reconcile(self, job: Job) -> None:
        """After a restart: adopt the job's process if it still runs, else settle the record from its .rc file."""
        if job.pid and job.pid_start and _proc_start(job.pid) == job.pid_start:
            job.message = "adopted after an app restart"
            return
        self._finish(job, None)

    def _save(self) -> None:
        records = sorted(self.jobs.values(), key=lambda j: j.id)
        if len(records) > KEEP_RECORDS:  # forget the oldest finished records (their logs stay on disk)
            drop = [j.id for j in records if j.status in DONE][: len(records) - KEEP_RECORDS]
            for job_id in drop:
                self.jobs.pop(job_id, None)
            records = sorted(self.jobs.values(), key=lambda j: j.id)
        adapter.atomic_write_json(self.path, {"version": 1, "jobs": [asdict(j) for j in records]})

    # --- public ---------------------------------------------------------------------------------------------
    def submit(
        self, kind: str, argv: list[str], title: str, target: dict[str, Any] | None = None, queued: bool = True
    ) -> Job:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("a job's command is a non-empty list of strings")
        with self._lock:
            number = max((int(j.split("-", 1)[0]) for j in self.jobs if j.split("-", 1)[0].isdigit()), default=0) + 1
            job = Job(f"{number:05d}-{kind}", kind, title, list(argv), dict(target or {}), queued, created=time.time())
            self.jobs[job.id] = job
            self._save()
        self.tick()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self.jobs.values(), key=lambda j: j.id, reverse=True)

    def active_for(self, key: str, value: str) -> Job | None:
        """The queued or running job whose target[key] == value, if any."""
        with self._lock:
            for job in self.jobs.values():
                if job.status in ("queued",) + ACTIVE and job.target.get(key) == value:
                    return job
        return None

    def last_for(self, key: str, value: str) -> Job | None:
        with self._lock:
            found = [j for j in self.jobs.values() if j.target.get(key) == value]
        return max(found, key=lambda j: j.id) if found else None

    def stop(self, job_id: str) -> Job:
        """Cancel a queued job; SIGTERM a running one (SIGKILL follows after the grace period)."""
        with self._lock:
            job = self.jobs[job_id]
            if job.status == "queued":
                job.status, job.ended, job.message = "cancelled", time.time(), "cancelled before it started"
            elif job.status == "running" and job.pid:
                job.status, job.stop_requested = "stopping", time.time()
                self._signal(job, signal.SIGTERM)
            self._save()
            return job

    def log_path(self, job: Job) -> Path:
        return self.logs / f"{job.id}.log"

    def log_tail(self, job: Job, limit: int = 8000) -> str:
        """The end of the job's output, with progress-bar redraws (carriage returns) collapsed."""
        path = self.log_path(job)
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - limit))
                raw = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(
            line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r") for line in raw.split("\n")
        )

    def failure_reason(self, job: Job, limit: int = 1500) -> str:
        """Why a job failed, as its command said it: from the last `dopsd COMMAND: …` message in its output (the
        line every refused or failed dopsd command ends with) to the end; else the record's own message."""
        tail = self.log_tail(job, 20_000).rstrip()
        prefix = f"dopsd {job.argv[3]}: " if len(job.argv) > 3 and job.argv[1:3] == ["-m", "dopsd.cli"] else "dopsd "
        at = max(tail.rfind("\n" + prefix), -1 if not tail.startswith(prefix) else 0)
        if at == -1:
            lines = [line for line in tail.splitlines() if line.strip()]
            said = "\n".join(lines[-3:])
        else:
            said = tail[at:].strip()
        said = said[:limit] + (" …" if len(said) > limit else "")
        return said or job.message or f"it ended with status {job.status}"

    def set_max_running(self, n: int) -> None:
        with self._lock:
            self.max_running = max(1, int(n))
        self.tick()

    # --- the loop -------------------------------------------------------------------------------------------
    def start(self, interval: float = 0.5) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.tick()
                except Exception as err:  # noqa: BLE001 - the watcher must outlive one bad tick; say why
                    print(f"dopsd ui: job watcher: {type(err).__name__}: {err}", file=sys.stderr)

        self._thread = threading.Thread(target=loop, name="dopsd-ui-jobs", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop watching; running jobs keep running (a restarted app adopts them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def tick(self) -> None:
        with self._lock:
            changed = False
            for job in list(self.jobs.values()):
                if job.status in ACTIVE:
                    if not self._alive(job):
                        self._finish(job, self._procs.pop(job.id, None))
                        changed = True
                    elif job.status == "stopping" and time.time() - (job.stop_requested or 0) > self.grace:
                        self._signal(job, signal.SIGKILL)
            for job in sorted(self.jobs.values(), key=lambda j: j.id):
                if job.status != "queued":
                    continue
                busy = sum(1 for j in self.jobs.values() if j.status in ACTIVE and j.queued)
                if job.queued and busy >= self.max_running:
                    continue
                self._launch(job)
                changed = True
            if changed:
                self._save()

    def _alive(self, job: Job) -> bool:
        proc = self._procs.get(job.id)
        if proc is not None:
            return proc.poll() is None
        return bool(job.pid and job.pid_start and _proc_start(job.pid) == job.pid_start)

    def _signal(self, job: Job, sig: int) -> None:
        if not job.pid or not self._alive(job):
            return
        try:
            os.killpg(job.pid, sig)  # the runner leads its own session: its PID is the group's ID
        except (ProcessLookupError, PermissionError):
            pass

    def _launch(self, job: Job) -> None:
        rc_file = self.logs / f"{job.id}.rc"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        try:
            with open(self.log_path(job), "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dopsd.ui.runner", str(rc_file), "--", *job.argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=str(self.home.root),
                    env=env,
                    start_new_session=True,
                )
        except OSError as err:
            job.status, job.ended, job.message = "failed", time.time(), f"could not start: {err}"
            return
        self._procs[job.id] = proc
        job.status, job.started, job.pid = "running", time.time(), proc.pid
        job.pid_start = _proc_start(proc.pid)

    def _finish(self, job: Job, proc: subprocess.Popen | None) -> None:
        import json

        if proc is not None:
            proc.wait()
        rc_file = self.logs / f"{job.id}.rc"
        returncode = None
        try:
            returncode = int(json.loads(rc_file.read_text())["returncode"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        job.ended, job.returncode = time.time(), returncode
        if job.stop_requested:
            job.status = "stopped"
            job.message = "stopped on request" + ("" if returncode is not None else " (killed)")
        elif returncode == 0:
            job.status = "succeeded"
        elif returncode is not None:
            job.status, job.message = "failed", f"exit code {returncode}"
        elif proc is not None:
            job.status, job.message = (
                "failed",
                f"killed by signal {-proc.returncode}"
                if proc.returncode < 0
                else f"ended without an exit status ({proc.returncode})",
            )
        else:
            job.status, job.message = "lost", "its process ended while the app was not running; no exit status"
