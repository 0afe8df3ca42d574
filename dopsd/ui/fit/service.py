"""The app's side of "will it fit?": one plan process (dopsd.ui.fit.worker), one request at a time.

A request is the config the form describes. The same settings again get the kept answer at once (a finished
answer per setting is kept; the same settings while they are being planned join that request). Different
settings cancel the request in flight: its process is killed (SIGKILL to its process group: the planner holds
no state worth a clean exit) and a new one plans the new request, so at most one plan runs at any time and no
late answer of an old request can arrive. Answers carry their request's id; the page shows only its latest's.
The server itself never imports torch: only the plan process does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

KEEP_ANSWERS = 64  # settings whose finished answers are kept (a few KB each)
KEEP_REQUESTS = 32  # requests whose state can still be read by id


class FitService:
    def __init__(self, env: dict[str, str] | None = None, log: Path | None = None):
        self.env = dict(env or {})
        self.log = log  # the plan process's own output (warnings, a planner bug's traceback)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._current: str | None = None  # the request the process works on
        self._requests: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._answers: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._count = 0
        self.processes_started = 0

    # --- requests -------------------------------------------------------------------------------------------
    def ask(self, config_yaml: str) -> dict[str, Any]:
        """The state of the request for this config: finished at once when known, else planning."""
        key = hashlib.sha256(config_yaml.encode()).hexdigest()[:24]
        with self._lock:
            if key in self._answers:
                self._cancel_current("replaced by settings with a kept answer")  # nothing plans for nobody
                self._answers.move_to_end(key)
                request = self._new(key, self._answers[key], "done")
                request["cached"] = True
                return self._public(request)
            current = self._requests.get(self._current) if self._current else None
            if current is not None and current["key"] == key and current["status"] == "running":
                return self._public(current)
            self._cancel_current("replaced by newer settings")
            request = self._new(key, None, "running")
            try:
                self._send(request["id"], config_yaml)
            except OSError as err:
                request.update(status="error", error=f"could not start the plan process: {err}")
            return self._public(request)

    def get(self, rid: str) -> dict[str, Any] | None:
        with self._lock:
            request = self._requests.get(rid)
            return self._public(request) if request else None

    def cancel(self, rid: str | None = None) -> None:
        """Cancel the request in flight (only if it is `rid`, when given): its process is killed."""
        with self._lock:
            if rid is None or rid == self._current:
                self._cancel_current("cancelled (the page changed)")

    def in_flight(self) -> int:
        """Plans running now: 0 or 1."""
        with self._lock:
            return int(self._current is not None and self._alive())

    def close(self) -> None:
        with self._lock:
            self._cancel_current("the app is stopping")
            self._kill()

    # --- internals (under the lock) ---------------------------------------------------------------------------
    def _new(self, key: str, answer: dict[str, Any] | None, status: str) -> dict[str, Any]:
        self._count += 1
        rid = f"fit-{self._count}"
        request = {"id": rid, "key": key, "status": status, "answer": answer, "error": None, "cached": False}
        request["started"] = time.time()
        self._requests[rid] = request
        while len(self._requests) > KEEP_REQUESTS:
            self._requests.popitem(last=False)
        return request

    def _public(self, request: dict[str, Any]) -> dict[str, Any]:
        # a copy: the reader thread goes on filling the answer in while this one is sent
        out = copy.deepcopy({k: v for k, v in request.items() if k != "key"})
        out["in_flight"] = int(self._current is not None and self._alive())
        out["elapsed"] = round(time.time() - request["started"], 1)
        return out

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _cancel_current(self, why: str) -> None:
        if self._current is None:
            return
        request = self._requests.get(self._current)
        if request is not None and request["status"] == "running":
            request.update(status="cancelled", error=why)
        self._current = None
        self._kill()  # its answer would be for settings nobody looks at any more

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # it leads its own session: the group is the process
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # its stdout is closed by its reader thread, at the end of the output
        except OSError:
            pass

    def _send(self, rid: str, config_yaml: str) -> None:
        if not self._alive():
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        self._current = rid
        self._proc.stdin.write(json.dumps({"id": rid, "yaml": config_yaml}) + "\n")
        self._proc.stdin.flush()

    def _start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        err: IO[Any] | int = subprocess.DEVNULL
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            err = open(self.log, "ab")  # noqa: SIM115 - the child keeps it; closed here right after the start
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dopsd.ui.fit.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                start_new_session=True,
            )
        finally:
            if not isinstance(err, int):
                err.close()
        self._proc = proc
        self.processes_started += 1
        threading.Thread(target=self._read, args=(proc,), name="dopsd-ui-fit", daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        """The plan process's answers, into the state of the request they belong to (none after a kill)."""
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if proc is not self._proc:
                    break  # killed: whatever it still printed belongs to a cancelled request
                self._take(message)
        proc.stdout.close()
        with self._lock:
            if proc is self._proc and self._current is not None:
                request = self._requests.get(self._current)
                if request is not None and request["status"] == "running":
                    code = proc.poll()
                    request.update(status="error", error=f"the plan process ended unexpectedly (exit code {code})")
                self._current = None
                self._proc = None

    def _take(self, message: dict[str, Any]) -> None:
        request = self._requests.get(str(message.get("id")))
        if request is None or request["id"] != self._current:
            return
        event, data = message.get("event"), message.get("data") or {}
        if event == "base":
            request["answer"] = data
        elif event == "card" and request["answer"] is not None:
            request["answer"]["cards"][str(data["card"])] = data
        elif event == "done":
            if request["answer"] is not None:
                request["answer"]["seconds"] = data.get("seconds")
                self._answers[request["key"]] = request["answer"]
                while len(self._answers) > KEEP_ANSWERS:
                    self._answers.popitem(last=False)
            request["status"], self._current = "done", None
        elif event == "error":
            request.update(status="error", error=data.get("message") or "the plan failed")
            self._current = None
