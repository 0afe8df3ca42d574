"""Python API mirroring `dopsd train`: `dopsd.train(config) -> Result`.

A start checks everything (config, run folder, dataset, model, features, checkpoint) before it writes anything;
then `Trainer.fit` trains in the run folder (its layout: dopsd.runs.folder). A run that does not end "ok" raises a
TrainingFailed subclass after writing its summary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dopsd.config import Config, load_config
from dopsd.data.checks import check_prompts
from dopsd.data.dataset import check_dataset
from dopsd.files import disk_full
from dopsd.methods.terms import terms_for
from dopsd.models.image_features import check_feature_folder
from dopsd.models.quantize import check_available, planned_device
from dopsd.models.registry import check_teacher_folder
from dopsd.runs import lock as runlock
from dopsd.runs.folder import OutputExistsError, check_resume_config
from dopsd.training import continual, stopping
from dopsd.training.trainer import Result, StepCallback, Trainer

__all__ = ["train", "Result", "OutputExistsError"]


def train(
    config: Config | str | Path | dict[str, Any],
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    adapter: Any = None,
    callback: StepCallback | None = None,
) -> Result:
    """Train as `dopsd train` does. `config`: a Config, a YAML path, a preset name or a dict.

    `adapter` (optional) is an already-built model adapter to train instead of loading config.model
    (tests pass a tiny random miniature). `callback(trainer, record)` runs on every process after each
    optimizer step (e.g. to evaluate `trainer.network`; `record["seconds"]` is the step's own time). Before
    anything is written: ConfigError, DatasetError, RunFolderError (OutputExistsError for an existing folder),
    CheckpointError. After training: TrainingAborted (too many non-finite steps) or TrainingUnhealthy (a broken
    model); summary.json says which. `overwrite` moves an earlier dopsd run in train.output_dir aside (never
    deletes it).
    """
    cfg = load_config(config, overrides)
    previous = set_threads(cfg)
    try:
        return _train(cfg, resume, overwrite, adapter, callback)
    finally:
        import torch

        torch.set_num_threads(previous)  # a Python caller's own setting comes back after the run


def cpu_threads(cfg: Config) -> int | None:
    """train.threads, or the automatic choice (None = keep torch's): 1 thread per process for CPU training on a
    machine with at most 4 cores, unless OMP_NUM_THREADS says otherwise (see the option's help)."""
    if cfg.train.threads is not None:
        return cfg.train.threads
    import torch

    on_cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()
    if on_cpu and "OMP_NUM_THREADS" not in os.environ and (os.cpu_count() or 1) <= 4:
        return 1
    return None


def set_threads(cfg: Config) -> int:
    """Apply `cpu_threads(cfg)`; returns the previous torch thread count."""
    import torch

    previous = torch.get_num_threads()
    threads = cpu_threads(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    return previous


def _train(cfg: Config, resume: bool, overwrite: bool, adapter: Any, callback: StepCallback | None) -> Result:
    check_available(cfg.model.quantize, planned_device(cfg), cfg.lora.enabled)  # model.quantize fits this machine
    if cfg.train.init_from:  # one spelling in config.yaml, whatever the working directory of a later --resume
        cfg.train.init_from = str(Path(cfg.train.init_from).expanduser().resolve())
    plan = runlock.plan(cfg, resume=resume, overwrite=overwrite)
    if resume:
        check_resume_config(cfg, plan.out)
    continual.resolve(cfg)  # the run to start from: checked before the dataset and the model are read
    dataset = check_dataset(cfg.data, cfg.model, cfg.train.batch_size)  # every problem reported before anything starts
    check_prompts(cfg)
    if any(t.teacher for t in terms_for(cfg.method)):  # e.g. Z-Image's Qwen3-VL folder, before the models load
        check_teacher_folder(cfg.model)
    if cfg.sample.done and cfg.sample.done_features:  # the done signal's feature model (dopsd.training.done)
        check_feature_folder(cfg.sample.done_features, "sample.done_features")
    if int(os.environ.get("RANK", "0")) == 0:  # what training will do to the data, said once (not per process)
        print(dataset.summary(), flush=True)
    trainer = Trainer(cfg, plan.out, dataset.examples, adapter=adapter, resume=resume)
    trainer.prepare()  # model, features, LoRA, optimizer, checkpoint: the last checks before the folder is touched
    lock, aside = runlock.claim_all(
        plan,
        main=trainer.main,
        share=trainer.broadcast,
        barrier=trainer.acc.wait_for_everyone,
        seen=trainer.resumed.seen if trainer.resumed else None,
    )
    try:
        if aside is not None:
            print(
                f"dopsd train: moved the earlier run in {plan.out} aside to {aside} (nothing was deleted)", flush=True
            )
        return trainer.fit(callback, replaced=None if aside is None else str(aside))
    except Exception as err:
        if disk_full(err):  # which device, what is intact, how to resume; not a bug report
            raise stopping.no_space(trainer, err) from err
        raise
    finally:
        lock.release()
