"""How a training run ends before train.max_steps and keeps its work: on request, or when a disk fills.

On request: the first SIGINT (Ctrl-C) or SIGTERM (the web app's Stop, `kill`, a job scheduler) asks the loop to
finish the optimizer step it is in, write a checkpoint (atomically, with its health measured like every other)
and stop with `Interrupted`: exit code 128 + the signal's number (130, 143), progress.json status "interrupted",
no summary.json (`--resume` continues the run, bit-exact). Interval samples and the final samples of a stopping
run are skipped, so that it stops soon. A second signal stops at once: Ctrl-C raises KeyboardInterrupt, SIGTERM
exits 143; the steps since the last checkpoint are lost, the checkpoints are intact (each is written under a
temporary name and renamed when complete). A signal within a second of the first counts as the same request: a
launcher (torchrun, accelerate launch) forwards the terminal's Ctrl-C to workers that received it already. The handlers are set only while `Trainer.fit` runs and only in the
main thread (where Python runs them); in a DDP run every process stops after the same step (the requests are
all-reduced once per step).

A full disk: `no_space` says which device, that the previous checkpoint is intact and how to resume (exit 5).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from dopsd.errors import EXIT_SIGNAL_BASE, Interrupted, NoSpaceError
from dopsd.files import no_space as no_space_on
from dopsd.runs import checkpoint as ckpt
from dopsd.runs import folder as rundir

if TYPE_CHECKING:
    from dopsd.training.monitor import Monitor
    from dopsd.training.trainer import Trainer

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 1.0  # a second signal sooner than this after the first is the same request, delivered twice


def resume_command(trainer: Trainer) -> str:
    return f"dopsd train {trainer.out / rundir.CONFIG} --resume"


class StopRequests:
    """The signal handlers of one `Trainer.fit`: `install()` when the loop starts, `check()` between optimizer
    steps (checkpoints and raises `Interrupted` once a stop was asked for), `restore()` when the loop ends."""

    def __init__(self, trainer: Trainer, monitor: Monitor):
        self.trainer, self.monitor = trainer, monitor
        self.signum = 0  # the first signal received (0: none)
        self.first_at = 0.0
        self.previous: dict[int, Any] = {}

    def install(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum and time.monotonic() - self.first_at < REPEAT_WINDOW_S:
            return
        if self.signum:  # the second: at once, as without dopsd
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(EXIT_SIGNAL_BASE + signum)
        self.signum, self.first_at = signum, time.monotonic()
        if self.trainer.main:  # os.write: the progress bar may be in the middle of a write to stderr
            again = "Ctrl-C" if signum == signal.SIGINT else name
            os.write(
                2,
                f"\ndopsd train: {name} received: stopping after the current step and writing a checkpoint "
                f"(again {again} to stop at once, losing the steps since the last checkpoint)\n".encode(),
            )

    def requested(self) -> int:
        """The signal that asked to stop, on any process (0: none)."""
        t = self.trainer
        if t.world == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=t.acc.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def check(self) -> None:
        """Between optimizer steps: when a stop was asked for, checkpoint this step (unless it is checkpointed
        already) and raise `Interrupted` saying how to resume."""
        signum = self.requested()
        if not signum:
            return
        t, monitor = self.trainer, self.monitor
        if t.step > 0 and monitor.saved_step != t.step:
            t.checkpoint(monitor)
        name = signal.Signals(signum).name
        path = ckpt.checkpoint_dir(t.out / rundir.CHECKPOINTS, t.step)
        if t.step == 0:
            kept = "before the first step: nothing was trained. Start again (--overwrite moves this folder aside)"
        else:
            state = ckpt.read_state(path) if t.main else None
            verdict = {True: "good", False: "NOT good: see its state.json"}.get((state or {}).get("good"), "unmeasured")
            kept = (
                f"after step {t.step} of {t.cfg.train.max_steps}: checkpoint {path} is written ({verdict}). "
                f"Continue with `{resume_command(t)}`"
            )
        monitor.progress(rundir.STATUS_INTERRUPTED)
        raise Interrupted(f"stopped by {name} {kept}", signum)


def no_space(trainer: Trainer, err: BaseException) -> NoSpaceError:
    """A full disk during training: which device, what is intact, how to go on. The incomplete checkpoint of this
    step (if its writing failed) is removed: it could never be read and holds on to the space."""
    root = trainer.out / rundir.CHECKPOINTS
    where = err.path if isinstance(err, NoSpaceError) and err.path else getattr(err, "filename", None) or trainer.out
    if trainer.main:
        shutil.rmtree(ckpt.temp_dir(root, trainer.step), ignore_errors=True)
    kept = ckpt.list_checkpoints(root)
    if kept:
        after = (
            f"the checkpoints written before are intact (the newest: {kept[-1]}); free space there and continue "
            f"with `{resume_command(trainer)}`"
        )
    else:
        after = "no checkpoint was written yet; free space there and start again (--overwrite moves this run aside)"
    base = no_space_on(where, err)
    return NoSpaceError(f"{base} while training (step {trainer.step}): {after}", base.path)


__all__ = ["StopRequests", "no_space", "resume_command", "SIGNALS"]
