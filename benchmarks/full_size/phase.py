"""One `dopsd` command, run as a user runs it (dopsd.cli.main), measured: peak resident memory and peak live tensor
bytes per window of the run, and, for `dopsd train`, each optimizer step's time and the learning invariants.

    python benchmarks/full_size/phase.py --stats S.json [--checks] [--snapshot-at STEP DIR] [--stall-at N FILE] \
        -- train CONFIG overrides...

Windows: `setup` (loading, feature caching, the starting samples), `steps` (inside the trainer's optimizer steps),
`between` (checkpoints written between steps), `end` (final samples, weights, summary); a command other than
`train` is one window, `run`. Resident memory is the kernel's high-water mark (VmHWM), reset at each window's
start (/proc/self/clear_refs); live tensor bytes are the storages alive at once, followed through every op
(`Tracker`: a storage counts from the first op that creates or reads it until it is freed).

Instrumentation of `train` (it wraps `Trainer.train_step` and changes nothing it computes):
  --checks        after the last step: the student's and the EMA teacher's velocities on one input (and the
                  student's twice, to show the forward is deterministic), the largest weight difference
                  between them, how many EMA tensors never moved, and per step how many LoRA tensors got an
                  all-zero gradient
  --snapshot-at   copy the run folder to DIR when step STEP+1 begins: what a kill at that moment leaves
  --stall-at      at the N-th velocity call of the first step, write FILE and wait (the caller then kills -9)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

GiB = 2**30


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_rss_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not allowed here: the peak then runs from the process start
        pass


class Windows:
    """Peak RSS and live tensor bytes per named window (a name seen twice keeps its largest peak)."""

    def __init__(self, tracker: Any):
        self.tracker = tracker
        self.peaks: dict[str, dict[str, float]] = {}
        self.open()

    def open(self) -> None:
        reset_rss_peak()
        self.tracker.peak = self.tracker.current
        self.started = time.perf_counter()

    def close(self, name: str) -> None:
        rss, tensors = _status("VmHWM") / GiB, self.tracker.peak / GiB
        old = self.peaks.get(name, {"peak_rss_gib": 0.0, "peak_tensor_gib": 0.0, "seconds": 0.0})
        self.peaks[name] = {
            "peak_rss_gib": max(old["peak_rss_gib"], rss),
            "peak_tensor_gib": max(old["peak_tensor_gib"], tensors),
            "seconds": old["seconds"] + time.perf_counter() - self.started,
        }
        self.open()


def make_tracker():
    from torch._subclasses.fake_tensor import FakeTensor

    from dopsd.planner.fake import LiveBytes

    class Tracker(LiveBytes):
        """LiveBytes over a whole process: inputs are followed too (weights loaded without an op count from
        their first use), meta tensors and tensor subclasses without a storage are skipped, no FLOPs."""

        def _track(self, t: torch.Tensor) -> None:
            if t.device.type == "meta" or isinstance(t, FakeTensor):  # the planner's tensors hold no memory
                return
            try:
                super()._track(t)
            except (RuntimeError, NotImplementedError, TypeError):
                pass

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch protocol
            for t in tree_leaves((args, kwargs or {})):
                if isinstance(t, torch.Tensor):
                    self._track(t)
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._track(t)
            return out

    return Tracker()


def instrument(opts: argparse.Namespace, windows: Windows, record: dict[str, Any], stats: Path | None = None) -> Any:
    """Wrap Trainer.train_step: windows, step times, and the options' checks, snapshot and stall. Returns the
    function that takes the wrapper off again."""
    from dopsd.training.trainer import Trainer

    original = Trainer.train_step
    state: dict[str, Any] = {"first": True}
    record["steps"] = []

    def train_step(self: Trainer) -> dict[str, Any]:
        windows.close("setup" if state["first"] else "between")
        if state["first"]:
            state["first"] = False
            record["first_step"] = self.step + 1
            if opts.checks and self.teacher is not None:
                state["ema0"] = {k: v.detach().clone() for k, v in self.teacher.shadow.items()}
            if opts.stall_at:
                stall(self, *opts.stall_at)
        if opts.snapshot_at and self.step == int(opts.snapshot_at[0]):
            shutil.copytree(self.out, opts.snapshot_at[1])
        windows.open()
        started = time.perf_counter()
        out = original(self)
        seconds = time.perf_counter() - started
        windows.close("steps")
        zero = [n for n, p in self.trainable.items() if p.grad is None or not bool(p.grad.any())]
        record["steps"].append(
            {
                "step": self.step,
                "seconds": round(seconds, 2),
                "loss": out.get("loss"),
                "grad_norm": out.get("grad_norm"),
                "skipped": out.get("skipped"),
                "trainable_tensors": len(self.trainable),
                "zero_grad_tensors": len(zero),
                "zero_grad_examples": zero[:3],
            }
        )
        if opts.checks and self.step == self.cfg.train.max_steps:
            record["checks"] = learning_checks(self, state.get("ema0"))
        if stats is not None:  # so far, should the run be stopped before it ends (replaced at the end)
            from dopsd.files import atomic_write_json

            atomic_write_json(stats, {**record, "partial": True, "windows": windows.peaks})
        return out

    Trainer.train_step = train_step  # type: ignore[method-assign]
    return lambda: setattr(Trainer, "train_step", original)


@torch.no_grad()
def learning_checks(trainer: Any, ema0: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """The student's and the EMA teacher's velocity on the same input and context, as the trainer computes them
    (its autocast, its adapter and network, the teacher's weight swap)."""
    out: dict[str, Any] = {}
    if trainer.teacher is None:
        return out
    m = trainer.m
    ctx = trainer.contexts([trainer.sample_keys[0]])
    shape = (1, *trainer.adapter.latent_shape(m.height, m.width))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1234)).to(trainer.acc.device)
    sigma = trainer.schedule((m.height, m.width))[:1].to(trainer.acc.device)
    student = trainer.velocity(trainer.network)
    teacher = trainer.teacher.wrap(student)
    with trainer.acc.autocast():
        v1, v2, vt = student(x, sigma, ctx), student(x, sigma, ctx), teacher(x, sigma, ctx)
    diffs = [
        (p.detach().float() - trainer.teacher.shadow[n].float()).abs().max().item()
        for n, p in trainer.trainable.items()
    ]
    out.update(
        weights_max_abs_diff=max(diffs),
        student_repeat_max_abs_diff=(v1 - v2).abs().max().item(),
        student_teacher_max_abs_diff=(v1 - vt).abs().max().item(),
        velocity_max_abs=v1.abs().max().item(),
        velocities_finite=bool(torch.isfinite(v1).all() and torch.isfinite(vt).all()),
    )
    if ema0 is not None:
        moved = [(trainer.teacher.shadow[k].float() - v.float()).abs().max().item() for k, v in ema0.items()]
        out.update(ema_tensors=len(moved), ema_unmoved_tensors=sum(d == 0 for d in moved), ema_max_move=max(moved))
    return out


def stall(trainer: Any, n: str, marker: str) -> None:
    """Wait for ever at the n-th velocity call (mid-step), after writing `marker`."""
    adapter, calls = trainer.adapter, [0]
    velocity = adapter.velocity

    def waiting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == int(n):
            Path(marker).write_text(json.dumps({"step": trainer.step + 1, "call": calls[0]}))
            while True:
                time.sleep(60)
        return velocity(*args, **kwargs)

    adapter.velocity = waiting


def plan_cpu(argv: list[str]) -> int:
    """`dopsd plan`'s prediction with the CPU as target (the CPU's attention dispatch, single-tensor AdamW), as
    JSON on stdout: what the plan command computes for a GPU, for this machine."""
    from dopsd.config import load_config
    from dopsd.planner.plan import plan

    cfg = load_config(argv[0], argv[1:])
    print(json.dumps(plan(cfg, target="cpu", search=False)))
    return 0


def run(argv: list[str], stats: Path, opts: argparse.Namespace | None = None, logs: Path | None = None) -> int:
    """Run `dopsd ARGV` in this process, measured; write the record to `stats` (also on failure). With `logs`,
    the command's stdout and stderr go to LOGS.out and LOGS.err (else they stay where they are)."""
    import contextlib

    from dopsd import cli

    opts = opts or argparse.Namespace(checks=False, snapshot_at=None, stall_at=None)
    tracker = make_tracker()
    windows = Windows(tracker)
    record: dict[str, Any] = {"argv": argv}
    undo = instrument(opts, windows, record, stats) if argv and argv[0] == "train" else None
    started = time.perf_counter()
    rc = 1
    try:
        with contextlib.ExitStack() as stack:
            if logs is not None:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(f"{logs}.out", "w"))))
                stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(f"{logs}.err", "w"))))
            with tracker:
                rc = plan_cpu(argv[1:]) if argv[0] == "plan-cpu" else cli.main(argv)
    finally:
        if undo is not None:
            undo()
        windows.close("end" if argv[0] == "train" else "run")
        record.update(
            rc=rc,
            seconds=round(time.perf_counter() - started, 1),
            windows=windows.peaks,
            peak_rss_gib=max(w["peak_rss_gib"] for w in windows.peaks.values()),
            peak_tensor_gib=max(w["peak_tensor_gib"] for w in windows.peaks.values()),
        )
        stats.parent.mkdir(parents=True, exist_ok=True)
        stats.write_text(json.dumps(record, indent=2))
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--checks", action="store_true")
    parser.add_argument("--snapshot-at", nargs=2, metavar=("STEP", "DIR"))
    parser.add_argument("--stall-at", nargs=2, metavar=("N", "FILE"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    return run(command, opts.stats, opts)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
