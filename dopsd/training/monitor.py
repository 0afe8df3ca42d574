"""What a training run shows of itself while it trains (main process only): the progress bar, TensorBoard, the
loss trace, progress.json, and at each sampling interval the sample grids at the few-step setting and the
many-step control with the few-step health (dopsd.training.health, also in health.jsonl). File names and formats are
dopsd.runs.folder's.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dopsd.core.sampler import generate, sample_batch, sample_seed, seed_noise
from dopsd.data.images import grid_image
from dopsd.files import atomic_save_image, atomic_write_json
from dopsd.runs import folder as rundir
from dopsd.training.done import DoneSignal
from dopsd.training.health import HEALTH_THRESHOLD, TRAINING_PROMPTS_THRESHOLD, FewStepHealth
from dopsd.training.stopping import StopRequests

if TYPE_CHECKING:
    from pathlib import Path

    from dopsd.training.trainer import Trainer


def make_health(trainer: Trainer) -> Any:
    """The few-step health tracker (main process, not for editing models), or None when it is off. Built
    while the encoders are loaded: it encodes its prompts once."""
    cfg, m = trainer.cfg, trainer.m
    # a sharded network runs only with every process: then each one samples (the main one records)
    if not (cfg.sample.health and (trainer.main or trainer.sharded)) or m.editing:
        return None
    s = cfg.sample
    unrelated = s.health_prompts or cfg.method.prior_prompts[:4]
    # On the training prompts the intended change itself (a concept's colour) moves the sharpness score, so the
    # alarm waits for a larger drop there (dopsd.training.health's module doc has the measurements).
    threshold = HEALTH_THRESHOLD if unrelated else TRAINING_PROMPTS_THRESHOLD
    return FewStepHealth(
        trainer.adapter,
        unrelated or trainer.prompts[:4],
        height=m.height,
        width=m.width,
        seeds=tuple(s.seeds[:2]),
        steps=m.inference_steps,
        control_steps=s.control_steps,
        threshold=threshold,
        device=trainer.acc.device,
    )


PROGRESS_EVERY_S = 1.0  # progress.json is rewritten at most this often (and at every checkpoint and interval)


def wait_for_a_later_event_file_name(logs: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with its creation second. The purge
    of a killed run's steps past the checkpoint only works when the resumed run's file is read after the killed
    run's, so a resume within the same second waits for the next one (otherwise the process ids decide)."""
    seconds = [int(p.name.split(".")[3]) for p in logs.glob("events.out.tfevents.*") if p.name.split(".")[3].isdigit()]
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(0.05)


class Monitor:
    """Opened when the loop starts, closed when it ends. `latest`: the last `sample` result (grid paths and, when
    measured, the few-step health), which the run's verdict and summary read."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.latest: dict[str, Any] = {}
        cfg, out, main = trainer.cfg, trainer.out, trainer.main
        self.started, self.first_step, self.written = time.time(), trainer.step, 0.0
        self.saved_step = trainer.step  # the newest checkpoint's step (a resumed run starts at one; 0: none needed)
        self.started_iso = rundir.iso_time(trainer.started)
        self.writer = self.losses = self.health_trace = None
        if main and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run drops what a killed run logged after its checkpoint (those steps are trained again).
            if trainer.step:
                wait_for_a_later_event_file_name(out / rundir.LOGS)
            self.writer = SummaryWriter(str(out / rundir.LOGS), purge_step=trainer.step + 1 if trainer.step else None)
        if main:  # the traces restart from the checkpoint (a killed run may have logged further)
            self.losses = rundir.open_losses(out, trainer.history)
            self.health_trace = rundir.open_health(out, trainer.step)
            self.progress(rundir.STATUS_RUNNING)
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=cfg.train.max_steps,
            initial=trainer.step,
            disable=not (main and cfg.log.progress),
            desc=f"{cfg.method.name} {cfg.model.family}",
            unit="step",
            dynamic_ncols=True,
        )
        self.done = DoneSignal(trainer)  # the done signal at each sampling (dopsd.training.done)
        self.stop = StopRequests(trainer, self).install()  # signal handlers while the loop runs (until close)

    def step(self, record: dict[str, Any]) -> None:
        """After each optimizer step: the loss trace, TensorBoard and the progress bar."""
        t = self.trainer
        if not t.main:
            return
        self.losses.append(record)
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("step", "skipped") and isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(k if "/" in k else f"train/{k}", v, t.step)
        health = (self.latest.get("health") or {}).get("health")  # few-step health at the last interval
        self.bar.set_postfix(
            loss=f"{record['loss']:.4g}",
            lr=f"{record['lr']:.2g}",
            **({"health": f"{health:.3f}"} if isinstance(health, float) else {}),
            **self.done.postfix(),
        )
        self.bar.update(1)
        if time.time() - self.written >= PROGRESS_EVERY_S:
            self.progress(rundir.STATUS_RUNNING)

    def check_health(self) -> dict[str, Any] | None:
        """The few-step health of the network now by the cheap check (the few-step samples alone), summarised; None
        with health off. The trainer asks for it before a checkpoint of a step no sampling interval measured, so
        that a checkpoint is called good only when a measurement says so (dopsd.training.checkpoint)."""
        t = self.trainer
        if t.health is None:
            return None
        with torch.random.fork_rng(devices=None if torch.cuda.is_available() else []):  # the run stays exact
            measured = t.health.measure(t.network, control=False)
        keys = ("health", "broken", "problem")
        return {"step": t.step, **{k: measured[k] for k in keys}, "check": "few-step samples only"}

    def checkpointed(self) -> None:
        """After a checkpoint: what was logged up to it survives a kill, like the checkpoint itself."""
        self.saved_step = self.trainer.step
        if self.trainer.main:
            self.losses.sync()
            self.health_trace.sync()
            self.done.sync()
            if self.writer is not None:
                self.writer.flush()
            self.progress(rundir.STATUS_RUNNING)

    def progress(self, status: str) -> None:
        """progress.json now; the ETA from this session's own pace (sampling and checkpoints included)."""
        t = self.trainer
        if not t.main:
            return
        now, done, total = time.time(), t.step - self.first_step, t.cfg.train.max_steps
        eta = max(0.0, (total - t.step) * (now - self.started) / done) if done > 0 else None
        rundir.write_progress(
            t.out,
            {
                "step": t.step,
                "max_steps": total,
                "status": status,
                "started": self.started_iso,
                "updated": rundir.iso_time(now),
                "eta_seconds": None if eta is None else round(eta, 1),
                "pid": os.getpid(),
            },
        )
        self.written = now

    def sample(self, tag: str) -> dict[str, Any] | None:
        """Sample grids (and health) of the network now, as `samples/{tag}_{K}steps.png` (main process only).
        Returns the few-step health measured, summarised; None when none was."""
        t = self.trainer
        if not (t.main or t.sharded):  # a sharded network runs only with every process: each samples, main writes
            self.done.agree()
            return None
        # Sampling leaves the training RNG untouched, so a resumed run (which skips these samples) stays exact.
        with torch.random.fork_rng(devices=None if torch.cuda.is_available() else []):
            self.latest = self._sample(tag)
        self.done.agree()  # an early stop (train.stop_when_done) is decided by the main process, for all
        if t.step == self.first_step:  # the pace (for the ETA) counts from the first step on
            self.started = time.time()
        self.progress(rundir.STATUS_RUNNING)
        measured = self.latest.get("health")
        if measured is None:
            return None
        return {"step": t.step, **{k: measured[k] for k in ("health", "broken", "problem")}}

    def _sample(self, tag: str) -> dict[str, Any]:
        t = self.trainer
        s, m, adapter = t.cfg.sample, t.m, t.adapter
        seeds = list(s.seeds)
        contexts = [t.feats.load(key) for key in t.sample_keys for _ in seeds]
        # each (prompt, seed) its own noise, as `dopsd sample` draws it (dopsd.core.sampler.sample_seed): that command
        # with the run's prompts and seeds reproduces these grids
        noise = seed_noise(
            adapter.latent_shape(m.height, m.width),
            [sample_seed(seed, i) for i in range(len(t.prompts)) for seed in seeds],
        )
        if t.main:
            (t.out / rundir.SAMPLES).mkdir(exist_ok=True)
            # what the grids' rows and columns are, for whoever shows them (dopsd ui labels its gallery with it)
            atomic_write_json(rundir.sample_layout(t.out), {"prompts": list(t.prompts), "seeds": seeds})
        result: dict[str, Any] = {}
        few = None  # the few-step images: the done signal measures them
        batch = sample_batch(m.height, m.width, 8)  # 8 at small sizes, one image at 1024² (bounded decode memory)
        for steps in [m.inference_steps] + ([s.control_steps] if s.control_steps > 0 else []):
            sched = adapter.inference_schedule(m.height, m.width, steps)
            steps = len(sched) - 1  # None = the model's own count
            with t.acc.autocast():
                images = generate(
                    adapter, t.network, contexts, noise, sched, batch, device=t.acc.device, dtype=t.latent_dtype
                )
            few = images if few is None else few
            grid = grid_image(images, len(t.prompts), len(seeds))
            path = rundir.sample_grid(t.out, tag, steps)
            if t.main:
                atomic_save_image(path, grid)
            result[f"grid_{steps}"] = str(path)
            if self.writer is not None:
                self.writer.add_image(f"samples/{steps}steps", np.asarray(grid), t.step, dataformats="HWC")
        self.done.measure(few, self.writer)
        if t.health is not None:
            measured = t.health.measure(t.network)
            result["health"] = measured
            if t.main:
                self.health_trace.append(rundir.health_record(t.step, measured, t.health.threshold))
            if self.writer is not None:
                for k, v in t.health.scalars(measured).items():
                    self.writer.add_scalar(k, v, t.step)
            if measured.get("warning") and t.main:
                warnings.warn(f"step {t.step}: {measured['warning']}")
        return result

    def close(self) -> None:
        """Every file is closed even when one cannot be (a full disk fails the last flush); the first error is raised."""
        self.stop.restore()
        self.bar.close()
        failed: list[OSError] = []
        for closable in (self.losses, self.health_trace, self.done, self.writer):
            try:
                if closable is not None:
                    closable.close()
            except OSError as err:
                failed.append(err)
        if failed:
            raise failed[0]
