"""The done signal: when has a run learned its data, and when is it past it, on any model, without a fidelity score.

At every sampling interval (sample.every, and before training and at the end) the student's few-step samples of
the training captions are compared with the training images of those captions: the signal is the mean, over the
samples, of the distance to the nearest training image of the sample's caption. It falls while the run learns the
data and rises again once training pushes the samples past it (over-tinted, over-saturated, broken). Its lowest
step is "done"; summary.json reports it (`done.best_step`), done.jsonl and TensorBoard (`done/distance`) trace it,
the progress bar shows it, and `train.stop_when_done` stops the run once no new low came for `train.done_patience`
intervals (exit 0, summary.json `done.stopped_early`).

The samples: the sample grid's own few-step images when its prompts are training captions (the default,
sample.prompts empty; an editing model's grid samples training examples); otherwise the first sample.num_prompts
training examples' first captions at the first two sample seeds, sampled apart from the grid.

The features: `sample.done_features`, a local DINOv2/DINOv3/CLIP/SigLIP folder (cosine distance of the embeddings,
as `dopsd eval` measures); without one the colour distribution of the pixels ("palette": per channel, the RMS
difference of the sorted values of the image area-downsampled to at most 32×32, i.e. the 1-D optimal-transport
distance of the colour histograms, as `dopsd probe`'s PixelScorer). The palette is blind to shape and identity
and sees colour, tint and contrast, which is what a concept colour or a look changes. On the miniature (400 steps,
sampled every 25) its lowest step came 25-50 steps after the domain's tint-fidelity peak, before the over-tinted
decline, and inside the concept's fidelity plateau; docs/done-signal.md has the measurements.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dopsd.core.sampler import generate, sample_batch, sample_seed, seed_noise
from dopsd.data.image_files import load_image
from dopsd.data.images import to_pil, to_tensor
from dopsd.models.image_features import HFImageFeatures
from dopsd.runs import checkpoint as ckpt
from dopsd.runs import folder as rundir
from dopsd.training.processes import broadcast

if TYPE_CHECKING:
    from dopsd.training.trainer import Trainer

DONE = rundir.DONE  # in the run folder: one record per measurement (step, distance, best_step, best, ...)
PALETTE_SIDE = 32  # the palette's downsampled side (at most; the image's own side when smaller)
OWN_SEEDS = 2  # seeds per caption when the grid's prompts are not training captions
# "as good as the lowest": a step whose samples are on average no further from the data than the lowest step's by
# more than this many standard errors of the mean paired difference (the same prompts and seeds each time). Fixed
# before any run measured it: two standard errors, so a step truly as good is called worse about 2.5% of the time,
# and a step worse by less than about two standard errors can pass as good.
AS_GOOD_SE = 2.0


def palette(images: torch.Tensor) -> torch.Tensor:
    """(B, 3·s²): each channel's values of the area-downsampled image, sorted (position-invariant)."""
    side = min(PALETTE_SIDE, images.shape[-2], images.shape[-1])
    x = F.interpolate(images.float(), size=(side, side), mode="area").flatten(2)
    return x.sort(-1).values.flatten(1)


def palette_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Na, Nb) RMS difference of palettes: the colour distributions' 1-D optimal-transport distance."""
    return torch.cdist(a, b) / math.sqrt(a.shape[1])


def earliest_as_good(
    steps: list[int], per_sample: list[list[float]], se: float = AS_GOOD_SE, lowest_step: int | None = None
) -> int:
    """The first step whose samples are as close to the data as the lowest step's, within the signal's own
    sampling noise: the mean paired difference of the per-sample distances to the lowest step's is at most `se`
    standard errors. Where the signal creeps down on a plateau this is the plateau's start; where it has a clear
    minimum it is that minimum. Needs the same samples (prompts, seeds) at every step. `lowest_step`: the caller's
    own lowest step (so both agree on a near tie); by default the lowest mean of `per_sample`."""
    values = torch.tensor(per_sample, dtype=torch.float64)
    lowest = int(values.mean(1).argmin()) if lowest_step is None else steps.index(lowest_step)
    diff = values[: lowest + 1] - values[lowest]
    n = values.shape[1]
    spread = diff.std(1, correction=1) / math.sqrt(n) if n > 1 else torch.zeros(len(diff), dtype=torch.float64)
    as_good = diff.mean(1) <= se * spread
    return steps[int(as_good.nonzero()[0])]  # the lowest step itself always qualifies


class DoneSignal:
    """Built by the monitor when the loop starts. `measure(images)` at each sampling, `stopped` once the early
    stop decided, `summary()` for summary.json. Main process only, except `agree` (every process)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        cfg = trainer.cfg
        self.on = cfg.sample.done
        self.patience, self.stop_wanted = cfg.train.done_patience, cfg.train.stop_when_done and self.on
        self.stopped, self.reason = False, None
        self.records: list[dict[str, Any]] = []
        self.trace: rundir.Trace | None = None
        self.features: HFImageFeatures | None = None
        self.name = "palette"
        self.targets: list[torch.Tensor] | None = None  # per sampled caption: features of its training images
        self.measured_step: int | None = None  # the step last measured (every process: a sharded run samples together)
        if not (self.on and trainer.main):
            return
        if cfg.sample.done_features:  # loaded now: a wrong folder fails before the first step, not at the first sample
            self.features = HFImageFeatures(cfg.sample.done_features, trainer.acc.device, "sample.done_features")
            self.name = self.features.name
        # the trace restarts at the checkpoint's step (a killed run may have measured further)
        self.records = rundir.read_done(trainer.out, trainer.step)
        self.trace = rundir.Trace(trainer.out / DONE, self.records)

    # --- which samples, against which images ------------------------------------------------------------
    def _plan(self) -> tuple[list[list[Any]], bool]:
        """Per sampled caption the training examples it is compared with, and whether the grid's images serve."""
        t = self.trainer
        if t.m.editing:  # the grid samples the first training examples themselves
            return [[t.examples[i]] for i in range(len(t.prompts))], True
        matches = [[ex for ex in t.examples if p in ex.captions] for p in t.prompts]
        if all(matches):
            return matches, True
        k = min(len(t.examples), t.cfg.sample.num_prompts)
        return [[t.examples[i]] for i in range(k)], False

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(to_pil(images)) if self.features is not None else palette(images)

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.features is not None:
            return 1 - F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
        return palette_distance(a, b)

    def _own_samples(self, count: int) -> torch.Tensor:
        """The first training examples' first captions at fixed seeds (when the grid shows other prompts)."""
        t = self.trainer
        m, seeds = t.m, list(t.cfg.sample.seeds[:OWN_SEEDS])
        contexts = [t.feats.load(t.feats.student[(i, 0)]) for i in range(count) for _ in seeds]
        noise = seed_noise(
            t.adapter.latent_shape(m.height, m.width), [sample_seed(s, i) for i in range(count) for s in seeds]
        )
        sched = t.adapter.inference_schedule(m.height, m.width, m.inference_steps)
        with t.acc.autocast():
            return generate(
                t.adapter,
                t.network,
                contexts,
                noise,
                sched,
                sample_batch(m.height, m.width, 8),
                device=t.acc.device,
                dtype=t.latent_dtype,
            )

    # --- one measurement -----------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, grid: torch.Tensor | None, writer: Any = None) -> dict[str, Any] | None:
        """The signal of the network now, from the grid's few-step images (rows: prompts, columns: seeds) or its
        own samples; recorded, logged, and the early stop decided. None when off or not the main process."""
        t = self.trainer
        if not self.on or not (t.main or t.sharded):  # a sharded network samples only with every process
            return None
        if self.measured_step == t.step:  # the final samples of a step measured already
            return self.records[-1] if self.records else None
        self.measured_step = t.step
        plan, from_grid = self._plan()
        if from_grid and grid is not None:
            images, per = grid, grid.shape[0] // len(plan)
        else:
            images = self._own_samples(len(plan))
            per = images.shape[0] // len(plan)
        if not t.main:  # the main process measures and writes
            return None
        if self.targets is None:
            size = tuple(images.shape[-2:])
            self.targets = [self._embed(to_tensor([load_image(ex.image, size) for ex in exs], size)) for exs in plan]
        feats = self._embed(images.nan_to_num(0.0, 1.0, -1.0).clamp(-1, 1))
        nearest = [
            self._distance(feats[i * per : (i + 1) * per], self.targets[i]).min(1).values for i in range(len(plan))
        ]
        per_sample = torch.cat(nearest)
        value = float(per_sample.mean())
        best = min(self.records, key=lambda r: r["distance"]) if self.records else None
        if best is None or value < best["distance"]:
            best_step, best_value = t.step, value
        else:
            best_step, best_value = best["step"], best["distance"]
        record = {
            "step": t.step,
            "distance": value,
            "best_step": best_step,
            "best": best_value,
            "features": self.name,
            "samples": int(images.shape[0]),
            "per_sample": [round(float(d), 6) for d in per_sample],
        }
        record["as_good_step"] = self._as_good(record, best_step)
        self.records.append(record)
        self.trace.append(record)
        if writer is not None:
            writer.add_scalar("done/distance", value, t.step)
            writer.add_scalar("done/best_step", best_step, t.step)
        since = sum(1 for r in self.records if r["step"] > best_step)
        if self.stop_wanted and since >= self.patience and t.step < t.cfg.train.max_steps:
            self.stopped = True
            self.reason = (
                f"done signal: the distance to the training images was lowest at step {best_step} "
                f"({best_value:.4g}) and no lower in the {since} sampling intervals since (train.done_patience="
                f"{self.patience}); stopped at step {t.step} of {t.cfg.train.max_steps} (train.stop_when_done)"
            )
            from tqdm.auto import tqdm

            tqdm.write(f"dopsd train: {self.reason}")
        return record

    def _as_good(self, record: dict[str, Any], best_step: int) -> int:
        """`earliest_as_good` over the measurements so far that have this one's samples (a run resumed from an
        older version, or whose grid changed, compares only like with like), against the signal's lowest step
        (the lowest itself when that measurement is not comparable)."""
        n = len(record["per_sample"])
        mine = [r for r in self.records if len(r.get("per_sample", ())) == n] + [record]
        steps = [r["step"] for r in mine]
        if best_step not in steps:
            return best_step
        return earliest_as_good(steps, [r["per_sample"] for r in mine], lowest_step=best_step)

    def agree(self) -> None:
        """Every process learns the main process's stop decision (a DDP/FSDP run stops after the same step)."""
        if self.stop_wanted:
            self.stopped = bool(broadcast(self.stopped, self.trainer.world))

    # --- what the run shows -----------------------------------------------------------------------------
    def postfix(self) -> dict[str, str]:
        return {"done": f"{self.records[-1]['distance']:.4g}"} if self.records else {}

    def sync(self) -> None:
        if self.trace is not None:
            self.trace.sync()

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()
            self.trace = None

    def summary(self) -> dict[str, Any] | None:
        """summary.json's `done`: the lowest step, the last measurement and whether the run stopped on it."""
        if not self.records:
            return None
        best = min(self.records, key=lambda r: r["distance"])
        last = self.records[-1]
        path = ckpt.checkpoint_dir(self.trainer.out / rundir.CHECKPOINTS, best["step"])
        return {
            "features": self.name,
            "best_step": best["step"],
            "best_distance": best["distance"],
            "as_good_step": last.get("as_good_step", best["step"]),
            "last_step": last["step"],
            "last_distance": last["distance"],
            "measurements": len(self.records),
            "stopped_early": self.stopped,
            "reason": self.reason,
            "best_checkpoint": str(path) if path.is_dir() else None,
        }


__all__ = ["AS_GOOD_SE", "DONE", "DoneSignal", "earliest_as_good", "palette", "palette_distance"]
