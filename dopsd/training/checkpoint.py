"""A Trainer's resumable state in its run folder's checkpoints: saving it (every n steps and at the end), adding
the final few-step health to the last one, and restoring it for --resume. The files and their checks are
dopsd.runs.checkpoint; the Trainer is dopsd.training.trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dopsd.errors import CheckpointError
from dopsd.runs import checkpoint as ckpt
from dopsd.runs import folder as rundir

if TYPE_CHECKING:
    from dopsd.training.trainer import Trainer


def save(trainer: Trainer) -> None:
    """Every process writes its RNG state; the main process the weights, shadows, optimizer, scheduler and loop
    state, then keeps the last train.keep_checkpoints."""
    root = trainer.out / rundir.CHECKPOINTS
    ckpt.write_rank_rng(root, trainer.step, trainer.rank)
    trainer.acc.wait_for_everyone()
    if trainer.main:
        # A prior that is the teacher is stored once; full fine-tuning reloads the original weights instead.
        prior = trainer.prior if (trainer.prior is not trainer.teacher and trainer.cfg.lora.enabled) else None
        weights = trainer.weights_verdict()
        # Good = finite, sane weights and no broken few-step health at the latest measurement (if any).
        good = weights["ok"] and not (trainer.last_health or {}).get("broken")
        ckpt.write_main(
            root,
            trainer.step,
            trainable=trainer.trainable,
            prior=None if prior is None else prior.state_dict(),
            teacher=None if trainer.teacher is None else trainer.teacher.state_dict(),
            optimizer=trainer.optimizer.state_dict(),
            scheduler=trainer.scheduler.state_dict(),
            state={
                "step": trainer.step,
                "order": trainer.order.state_dict(),
                "history": trainer.history,
                "nonfinite": trainer.nonfinite,
                "processes": trainer.world,
                "global_batch": trainer.global_batch,
                "dataset": trainer.dataset,
                "good": good,
                "weights": weights,
                "health": trainer.last_health,
            },
        )
        ckpt.finalise(root, trainer.step, trainer.cfg.train.keep_checkpoints)
    trainer.acc.wait_for_everyone()


def amend_health(trainer: Trainer) -> None:
    """Health measured after the checkpoint of the same step was written (the final one): record it there."""
    path = ckpt.checkpoint_dir(trainer.out / rundir.CHECKPOINTS, trainer.step)
    if trainer.main and trainer.last_health and trainer.last_health["step"] == trainer.step and path.is_dir():
        ckpt.amend(path, health=trainer.last_health, broken=bool(trainer.last_health.get("broken")))


def restore(trainer: Trainer) -> None:
    """--resume: the latest checkpoint's weights, shadows, optimizer, scheduler, RNG and loop state into
    `trainer` (after `prepare` built them); what does not fit the run is refused or noted in resume_notes."""
    root = trainer.out / rundir.CHECKPOINTS
    path, data, notes = ckpt.load_for_resume(root, trainer.rank, trainer.acc.device)
    notes += ckpt.check_fits(
        path, data["state"], dataset=trainer.dataset, processes=trainer.world, global_batch=trainer.global_batch
    )
    if not data["state"].get("good", True):
        why = (data["state"].get("weights") or {}).get("problem") or "its few-step health was broken"
        notes.append(
            f"{path} was not a good checkpoint when written ({why}); the last good one is "
            f"{ckpt.last_good(root) or 'none'}"
        )
    if set(data["trainable"]) != set(trainer.trainable):
        raise CheckpointError(
            f"{path} does not match the model's trainable weights (lora.targets or the model "
            "changed?); resume with the run's settings"
        )
    trainer.checkpoints_seen = [p.name for p in ckpt.list_checkpoints(root)]
    trainer.resume_notes = notes
    trainer.last_health = data["state"].get("health")
    with torch.no_grad():
        for name, p in trainer.trainable.items():
            p.copy_(data["trainable"][name])
    for shadow, saved in ((trainer.teacher, data["teacher"]), (trainer.prior, data["prior"])):
        if shadow is not None and saved is not None and shadow.mode != "live":
            shadow.load_state_dict(saved)
    trainer.optimizer.load_state_dict(data["optimizer"])
    trainer.scheduler.load_state_dict(data["scheduler"])
    ckpt.set_rng_state(data["rng"])
    state = data["state"]
    trainer.step, trainer.history, trainer.nonfinite = state["step"], state["history"], state["nonfinite"]
    trainer.order.load_state_dict(state["order"])
    trainer.resumed_from = str(path)
