"""Python API mirroring `dopsd train`: `dopsd.train(config) -> Result`.

The run folder (train.output_dir; layout, marker, locks, summary status: dopsd.rundir):
  dopsd-run.json, .dopsd-owner.lock, .dopsd-workers.lock   what makes it a dopsd run, and who runs in it
  config.yaml            the resolved config of the run
  losses.jsonl           one JSON record per optimizer step (loss, terms, lr, grad_norm, skipped, diagnostics)
  logs/                  TensorBoard
  samples/               grids: step-NNNNNNN_{K}steps.png at the few-step setting and the many-step control, final_*
  checkpoints/step-NNNNNNN/  resumable state (see dopsd.checkpoint), last train.keep_checkpoints kept
  lora.safetensors + lora_config.json   the LoRA (peft keys) and what `dopsd sample` needs to load it
  model.safetensors      instead of the LoRA for a full fine-tune
  pytorch_lora_weights.safetensors       diffusers format (real models, via dopsd.export)
  summary.json           what was trained, on what, for how long, and `status`: ok / unhealthy / aborted

A start checks everything (config, run folder, dataset, model, features, checkpoint) before it writes anything;
a run that does not end "ok" raises a TrainingFailed subclass after writing its summary.
"""

from __future__ import annotations

import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dopsd import checkpoint as ckpt
from dopsd import rundir
from dopsd.config import Config, ConfigError, load_config
from dopsd.data.dataset import check_dataset
from dopsd.errors import RunFolderError
from dopsd.rundir import OutputExistsError  # noqa: F401 - part of the API (raised for an existing folder)

# Keys that may change when resuming (extend a run, sample more often, …); anything else must match. The batch
# keys may change as long as the global batch stays the same (checked against the checkpoint).
RESUMABLE_CHANGES = ("train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite",
                     "train.output_dir", "train.device", "train.batch_size", "train.gradient_accumulation",
                     "sample.", "log.", "cache.")


@dataclass
class Result:
    output_dir: Path
    steps: int  # optimizer steps reached (counting skipped ones)
    losses: list[float]  # loss per step, the whole trace (resumed runs included)
    weights: Path | None  # lora.safetensors or model.safetensors
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # full per-step records


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("fsdp",):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resume_config(config: Config, out: Path) -> None:
    old, new = _flat(load_config(out / rundir.CONFIG).to_dict()), _flat(config.to_dict())
    changed = [k for k in new if old.get(k) != new[k] and not k.startswith(RESUMABLE_CHANGES) and k != "data.path"]
    if changed:
        raise ConfigError(f"--resume: the config differs from the run's config.yaml in {', '.join(changed)}; "
                          "resume with the same settings (only train.max_steps, sampling and logging may change)")


def _broadcast(trainer: Any, value: Any) -> Any:
    """The main process's `value` on every process (a decision only the main process can make)."""
    if trainer.world == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _claim(trainer: Any, plan: rundir.Plan) -> rundir.RunLock:
    """Take the run folder (main: create / move aside / lock; the others: join the lock), all or none."""
    lock, aside, failure = None, None, None
    if trainer.main:
        try:
            lock, aside = rundir.claim(plan)
            seen = getattr(trainer, "checkpoints_seen", None)
            now = [p.name for p in ckpt.list_checkpoints(plan.out / rundir.CHECKPOINTS)]
            if plan.mode == "resume" and seen is not None and seen != now:
                raise RunFolderError(f"the checkpoints in {plan.out} changed while this run started (another process "
                                     "resumed it meanwhile?); start again")
        except BaseException as err:  # noqa: BLE001 - every process must learn that the claim failed
            if lock is not None:
                lock.release()
            failure = err
    message = _broadcast(trainer, None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise RunFolderError(message)
    if not trainer.main:
        lock = rundir.join(plan.out)
    trainer.acc.wait_for_everyone()
    trainer.replaced = str(aside) if aside else None
    if aside is not None:
        print(f"dopsd train: moved the earlier run in {plan.out} aside to {aside} (nothing was deleted)", flush=True)
    return lock


def train(
    config: Config | str | Path | dict[str, Any],
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    adapter: Any = None,
    callback: Callable[[Any, dict[str, Any]], None] | None = None,
) -> Result:
    """Train as `dopsd train` does. `config`: a Config, a YAML path, a preset name or a dict.

    `adapter` (optional) is an already-built model adapter to train instead of loading config.model
    (tests pass a tiny random miniature). `callback(trainer, record)` runs on every process after each
    optimizer step (e.g. to evaluate `trainer.network`). Before anything is written: ConfigError, DatasetError,
    RunFolderError (OutputExistsError for an existing folder), CheckpointError. After training:
    TrainingAborted (too many non-finite steps) or TrainingUnhealthy (a broken model); summary.json says which.
    `overwrite` moves an earlier dopsd run in train.output_dir aside (never deletes it).
    """
    from dopsd import trainer as tr

    cfg = load_config(config, overrides)
    plan = rundir.plan(cfg, resume=resume, overwrite=overwrite)
    out = plan.out
    if resume:
        _check_resume_config(cfg, out)
    dataset = check_dataset(cfg.data, cfg.model)  # every problem reported before anything starts
    if int(os.environ.get("RANK", "0")) == 0:  # what training will do to the data, said once (not per process)
        print(dataset.summary(), flush=True)
    examples = dataset.examples
    t_start = time.time()
    trainer = tr.Trainer(cfg, out, examples, adapter=adapter, resume=resume)
    trainer.prepare()  # model, features, LoRA, optimizer, checkpoint: the last checks before the folder is touched
    lock = _claim(trainer, plan)
    try:
        if trainer.main:
            rundir.write_config(out, cfg.to_yaml())
            for note in trainer.resume_notes:
                warnings.warn(f"--resume: {note}")
        trainer.acc.wait_for_everyone()
        timing: dict[str, Any] = {"steps_this_run": 0, "loop_seconds": 0.0, "samples": {}}
        try:
            run_loop(trainer, callback, timing)
        except tr.TrainingAborted as err:
            if trainer.main:
                _write_summary(trainer, timing, time.time() - t_start, None, rundir.STATUS_ABORTED, str(err))
            raise
        weights, failure = None, None
        summary: dict[str, Any] = {}
        if trainer.main:  # the verdict needs the final health, which only the main process measures
            status, problem = _verdict(trainer, timing)
            weights = _save_final(trainer) if trainer.weights_verdict()["ok"] else None
            summary = _write_summary(trainer, timing, time.time() - t_start, weights, status, problem)
            print(format_summary(summary))
            if status != rundir.STATUS_OK:
                kept = f"the final weights are in {weights}" if weights else "no final weights were written"
                good = summary["last_good_checkpoint"] or "none"
                failure = (f"training finished but the model is broken: {problem}. {out / rundir.SUMMARY} records "
                           f"status '{status}'; {kept}; last good checkpoint: {good}. "
                           f"Lower optim.lr (now {cfg.optim.lr:g}) and start again (--overwrite moves this run aside)")
        failure = _broadcast(trainer, failure)
        trainer.acc.wait_for_everyone()
        if failure is not None:
            raise tr.TrainingUnhealthy(failure)
        return Result(out, trainer.step, [r["loss"] for r in trainer.history], weights, summary, trainer.history)
    finally:
        lock.release()


def _verdict(trainer: Any, timing: dict[str, Any]) -> tuple[str, str | None]:
    """ok, or unhealthy with the reason: non-finite/exploded weights, or broken few-step samples at the end."""
    problems = []
    weights = trainer.weights_verdict()
    if not weights["ok"]:
        problems.append(weights["problem"])
    health = timing["samples"].get("health") or {}
    if health.get("broken"):
        problems.append(health["problem"])
    return (rundir.STATUS_UNHEALTHY, "; ".join(problems)) if problems else (rundir.STATUS_OK, None)


def run_loop(trainer: Any, callback: Callable[[Any, dict[str, Any]], None] | None = None,
             timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train to max_steps with progress bar, TensorBoard, checkpoints, interval samples; returns (and fills
    `timing` as it goes, so an aborted run can still report it) the timing info."""
    from tqdm.auto import tqdm

    from dopsd.trainer import TrainingAborted

    cfg, out, main = trainer.cfg, trainer.out, trainer.main
    timing = timing if timing is not None else {"steps_this_run": 0, "loop_seconds": 0.0, "samples": {}}
    writer = None
    if main and cfg.log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops what a killed run logged after its checkpoint (those steps are trained again).
        writer = SummaryWriter(str(out / rundir.LOGS), purge_step=trainer.step + 1 if trainer.step else None)
    if main:  # the trace restarts from the checkpoint's history (a killed run may have logged further)
        rundir.restart_losses(out, trainer.history)
    bar = tqdm(total=cfg.train.max_steps, initial=trainer.step, disable=not (main and cfg.log.progress),
               desc=f"{cfg.method.name} {cfg.model.family}", unit="step", dynamic_ncols=True)
    samples: dict[str, Any] = {}
    try:
        if trainer.step == 0 and main:
            samples = timing["samples"] = trainer.sample_grids("step-0000000", writer)
        every, ck = cfg.sample.every, cfg.train.checkpoint_every
        t0, first = time.time(), trainer.step
        while trainer.step < cfg.train.max_steps:
            record = trainer.train_step()
            trainer.history.append({k: v for k, v in record.items() if not k.startswith("rollout/")})
            timing.update(steps_this_run=trainer.step - first, loop_seconds=time.time() - t0)
            if callback is not None:
                callback(trainer, record)
            if main:
                rundir.append_loss(out, record)
                if writer is not None:
                    for k, v in record.items():
                        if k not in ("step", "skipped") and isinstance(v, float) and math.isfinite(v):
                            writer.add_scalar(k if "/" in k else f"train/{k}", v, trainer.step)
                health = (samples.get("health") or {}).get("health")  # few-step health at the last interval
                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2g}",
                                **({"health": f"{health:.3f}"} if isinstance(health, float) else {}))
                bar.update(1)
            if record["skipped"]:
                msg = (f"step {trainer.step}: non-finite loss or gradient (loss {record['loss']}, grad norm "
                       f"{record['grad_norm']}); step skipped ({trainer.nonfinite} in a row)")
                if main:
                    warnings.warn(msg)
                if trainer.nonfinite >= cfg.train.max_nonfinite:
                    good = ckpt.last_good(out / rundir.CHECKPOINTS)
                    raise TrainingAborted(
                        f"{trainer.nonfinite} non-finite steps in a row (train.max_nonfinite); training stopped at step "
                        f"{trainer.step}. Last good checkpoint: {good or 'none'}. Lower optim.lr or check the data.")
                continue  # never checkpoint inside a bad streak
            done = trainer.step == cfg.train.max_steps
            if every and trainer.step % every == 0 and not done and main:  # first: a checkpoint records this health
                samples = timing["samples"] = trainer.sample_grids(f"step-{trainer.step:07d}", writer)
            if (ck and trainer.step % ck == 0) or done:
                trainer.save_checkpoint()
                if main:  # what was logged up to a checkpoint survives a kill, like the checkpoint itself
                    rundir.sync_losses(out)
                    if writer is not None:
                        writer.flush()
        trainer.acc.wait_for_everyone()
        timing.update(steps_this_run=trainer.step - first, loop_seconds=time.time() - t0)
        if main:
            timing["samples"] = trainer.sample_grids("final", writer)
            trainer.amend_checkpoint_health()  # the final checkpoint learns the final health
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return timing


def _save_final(trainer: Any) -> Path:
    from dopsd.lora.trained import save_trained

    cfg, out = trainer.cfg, trainer.out
    meta = {"family": cfg.model.family, "model": cfg.to_dict()["model"], "prompts": trainer.prompts,
            "steps": trainer.step, "method": cfg.method.name}
    lora = None
    if cfg.lora.enabled:
        targets = cfg.lora.targets or trainer.adapter.default_lora_targets()
        lora = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": targets}
    weights = save_trained(out, trainer.network, lora, meta)
    if cfg.lora.enabled and cfg.model.family in ("zimage", "flux2"):
        try:  # the formats other tools load (dopsd.export, real models only)
            from dopsd.export import save_diffusers

            save_diffusers(trainer.network, out)
        except Exception as err:  # noqa: BLE001 - the dopsd LoRA is saved; an export failure must not lose it
            warnings.warn(f"diffusers export failed ({err}); {weights} is saved, retry with `dopsd export`")
    return weights


def _write_summary(trainer: Any, timing: dict[str, Any], wall: float, weights: Path | None, status: str,
                   problem: str | None) -> dict[str, Any]:
    summary = {"status": status, "problem": problem, **_summary(trainer, timing, wall, weights)}
    good = ckpt.last_good(trainer.out / rundir.CHECKPOINTS)
    summary["last_good_checkpoint"] = str(good) if good else None
    summary["replaced"] = getattr(trainer, "replaced", None)  # where --overwrite moved an earlier run
    rundir.write_summary(trainer.out, summary)
    return summary


def _summary(trainer: Any, timing: dict[str, Any], wall: float, weights: Path | None) -> dict[str, Any]:
    cfg = trainer.cfg
    n_params = sum(p.numel() for p in trainer.trainable.values())
    losses = [r["loss"] for r in trainer.history if not r.get("skipped")]
    steps_run = timing["steps_this_run"]
    return {
        "what": f"{cfg.method.name} on {cfg.model.family} ({getattr(trainer.adapter, 'kind', None) or cfg.model.pretrained}), "
                + (f"LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "full fine-tune")
                + (f", teacher {cfg.method.teacher}" if cfg.method.name != "sft" else ""),
        "method": cfg.method.name, "teacher": cfg.method.teacher if cfg.method.name != "sft" else None,
        "family": cfg.model.family, "pretrained": cfg.model.pretrained,
        "trainable_parameters": n_params,
        "data": {"path": cfg.data.path, "images": len(trainer.examples),
                 "captions": sum(len(e.captions) for e in trainer.examples)},
        "steps": trainer.step, "steps_this_run": steps_run,
        "global_batch": cfg.train.batch_size * trainer.world * cfg.train.gradient_accumulation,
        "processes": trainer.world, "device": str(trainer.acc.device),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "seconds_total": round(wall, 2), "seconds_loop": round(timing["loop_seconds"], 2),
        "steps_per_second": round(steps_run / timing["loop_seconds"], 3) if timing["loop_seconds"] > 0 else None,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "skipped_steps": sum(1 for r in trainer.history if r.get("skipped")),
        "cache": {"hits": trainer.cache.hits, "misses": trainer.cache.misses},
        "resumed_from": getattr(trainer, "resumed_from", None),
        "weights": str(weights) if weights else None, "samples": {k: v for k, v in timing["samples"].items() if k.startswith("grid_")},
        "health": {k: v for k, v in (timing["samples"].get("health") or {}).items()
                   if isinstance(v, (float, bool, str)) or v is None},
        "health_step": (getattr(trainer, "last_health", None) or {}).get("step"),  # when `health` was measured
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"status: {s['status']}" + (f" ({s['problem']})" if s.get("problem") else ""),
        f"trained: {s['what']}",
        f"data: {s['data']['images']} images from {s['data']['path']}",
        f"steps: {s['steps']} (this run {s['steps_this_run']}, global batch {s['global_batch']}, "
        f"{s['processes']} process(es) on {s['device']}) in {s['seconds_total']:.1f} s",
        f"loss: {s['first_loss']:.4g} -> {s['final_loss']:.4g}" if s["final_loss"] is not None else "loss: -",
        f"weights: {s['weights']}",
    ]
    if s["skipped_steps"]:
        lines.append(f"skipped steps (non-finite): {s['skipped_steps']}")
    lines += [f"samples: {v}" for v in s["samples"].values()]
    return "\n".join(lines)
