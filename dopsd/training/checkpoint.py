"""A training run's checkpoints, in torchtitan's pattern: each stateful part of the run gives its `state_dict()`
and takes it back with `load_state_dict()` — the trainable weights, the teacher and prior shadows, the optimizer,
the LR scheduler, every process's RNG, and the loop itself (`Trainer.state_dict()`: step, data order, history,
non-finite streak, latest few-step health) — and this module saves them together every n steps and at the end,
adds the final health to the last checkpoint, and restores them for --resume. It writes no attribute of the
trainer: what resuming found is returned (`Resumed`). The files and their checks are dopsd.runs.checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dopsd.core.weights import copy_full_
from dopsd.errors import CheckpointError
from dopsd.lora.meta import checkpoint_metadata
from dopsd.runs import checkpoint as ckpt
from dopsd.runs import folder as rundir
from dopsd.training import sharding

if TYPE_CHECKING:
    from dopsd.training.trainer import Trainer


@dataclass
class Resumed:
    """What --resume found: the checkpoint it continues from, what did not fit the run as before (said as warnings
    when the loop starts) and the checkpoints there were (the run folder's claim checks that none appeared since)."""

    path: Path
    notes: list[str]
    seen: list[str]


def save(trainer: Trainer) -> None:
    """Every process writes its RNG state; the main process the weights, shadows, optimizer, scheduler and loop
    state, then keeps the last train.keep_checkpoints."""
    root = trainer.out / rundir.CHECKPOINTS
    ckpt.write_rank_rng(root, trainer.step, trainer.rank)
    trainer.acc.wait_for_everyone()
    # A prior that is the teacher is stored once; full fine-tuning reloads the original weights instead.
    prior = trainer.prior if (trainer.prior is not trainer.teacher and trainer.cfg.lora.enabled) else None
    weights = trainer.weights_verdict()  # every process: sharded weights are measured and gathered by all
    parts = sharding.checkpoint_parts(trainer, prior)
    if trainer.main:
        loop = trainer.state_dict()
        # Good = finite, sane weights and few-step health measured at this step and not broken (Trainer.checkpoint
        # measures it); unmeasured (health off) = None, never called good; bad weights = False whatever the health.
        health = loop["health"] if (loop["health"] or {}).get("step") == loop["step"] else None
        good = False if not weights["ok"] else None if health is None else not health.get("broken")
        ckpt.write_main(
            root,
            trainer.step,
            trainable=parts["trainable"],
            prior=parts["prior"],
            teacher=parts["teacher"],
            optimizer=parts["optimizer"],
            scheduler=trainer.scheduler.state_dict(),
            # the loop's state, and what a resumed run must match (dopsd.runs.checkpoint.check_fits)
            state={
                **loop,
                "processes": trainer.world,
                "global_batch": trainer.global_batch,
                "dataset": trainer.dataset,
                "good": good,
                "weights": weights,
            },
            lora_metadata=checkpoint_metadata(trainer.network),
        )
        ckpt.finalise(root, trainer.step, trainer.cfg.train.keep_checkpoints)
    trainer.acc.wait_for_everyone()


def amend_health(trainer: Trainer) -> None:
    """Health measured after the checkpoint of the same step was written (the final one): record it there."""
    path = ckpt.checkpoint_dir(trainer.out / rundir.CHECKPOINTS, trainer.step)
    if trainer.main and trainer.last_health and trainer.last_health["step"] == trainer.step and path.is_dir():
        ckpt.amend(path, health=trainer.last_health, broken=bool(trainer.last_health.get("broken")))


def restore(trainer: Trainer) -> Resumed:
    """--resume: the latest checkpoint's parts into the parts `prepare` built (weights, shadows, optimizer,
    scheduler, RNG, the loop's state); what does not fit the run is refused, or noted in the returned notes."""
    root = trainer.out / rundir.CHECKPOINTS
    path, data, notes = ckpt.load_for_resume(root, trainer.rank, trainer.device)
    state = data["state"]
    notes += ckpt.check_fits(
        path, state, dataset=trainer.dataset, processes=trainer.world, global_batch=trainer.global_batch
    )
    if state.get("good") is False:
        why = (state.get("weights") or {}).get("problem") or "its few-step health was broken"
        notes.append(
            f"{path} was not a good checkpoint when written ({why}); the last good one is "
            f"{ckpt.last_good(root) or 'none'}"
        )
    if set(data["trainable"]) != set(trainer.trainable):
        raise CheckpointError(
            f"{path} does not match the model's trainable weights (lora.targets or the model "
            "changed?); resume with the run's settings"
        )
    seen = [p.name for p in ckpt.list_checkpoints(root)]
    for name, p in trainer.trainable.items():
        copy_full_(p, data["trainable"][name])  # a sharded weight takes its own part of the whole one
    for shadow, saved in ((trainer.teacher, data["teacher"]), (trainer.prior, data["prior"])):
        if shadow is not None and saved is not None and shadow.mode != "live":
            shadow.load_state_dict(saved)
    sharding.load_optimizer_state(trainer.optimizer, data["optimizer"])
    trainer.scheduler.load_state_dict(data["scheduler"])
    ckpt.set_rng_state(data["rng"])
    trainer.load_state_dict(state)
    return Resumed(path, notes, seen)
