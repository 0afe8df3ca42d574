"""Python API mirroring `dopsd train`: `dopsd.train(config) -> Result`.

Output folder (train.output_dir):
  config.yaml            the resolved config of the run
  losses.jsonl           one JSON record per optimizer step (loss, terms, lr, grad_norm, skipped, diagnostics)
  logs/                  TensorBoard
  samples/               grids: step-NNNNNNN_{K}steps.png at the few-step setting and the many-step control, final_*
  checkpoints/step-NNNNNNN/  resumable state (see dopsd.checkpoint), last train.keep_checkpoints kept
  lora.safetensors + lora_config.json   the LoRA (peft keys) and what `dopsd sample` needs to load it
  model.safetensors      instead of the LoRA for a full fine-tune
  pytorch_lora_weights.safetensors       diffusers format (real models, via dopsd.export)
  summary.json           what was trained, on what, for how long, with which result
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dopsd.config import Config, ConfigError, load_config
from dopsd.data import check_dataset
from dopsd.errors import RunFolderError

# Keys that may change when resuming (extend a run, sample more often, …); anything else must match.
RESUMABLE_CHANGES = ("train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite",
                     "train.output_dir", "train.device", "sample.", "log.", "cache.")


class OutputExistsError(RunFolderError, FileExistsError):
    pass


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


def _check_output(config: Config, resume: bool, overwrite: bool) -> Path:
    out = Path(config.train.output_dir).expanduser()
    if resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {out} is not a dopsd run folder (no config.yaml)")
        from dopsd.checkpoint import latest

        if latest(out / "checkpoints") is None:
            raise FileNotFoundError(f"--resume: {out / 'checkpoints'} holds no complete checkpoint; start a new run")
        old, new = _flat(load_config(saved).to_dict()), _flat(config.to_dict())
        changed = [k for k in new if old.get(k) != new[k] and not k.startswith(RESUMABLE_CHANGES) and k != "data.path"]
        if changed:
            raise ConfigError(f"--resume: the config differs from the run's config.yaml in {', '.join(changed)}; "
                              "resume with the same settings (only train.max_steps, sampling and logging may change)")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists and is not empty; choose another train.output_dir, "
                                "pass --overwrite (overwrite=True) to replace it, or --resume to continue it")
    return out


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
    optimizer step (e.g. to evaluate `trainer.network`). Raises DatasetError before anything starts if the data is bad,
    OutputExistsError for an existing output folder, TrainingAborted after too many non-finite steps.
    """
    from dopsd import trainer as tr

    cfg = load_config(config, overrides)
    out = _check_output(cfg, resume, overwrite)
    dataset = check_dataset(cfg.data, cfg.model)  # every problem reported before anything starts
    if int(os.environ.get("RANK", "0")) == 0:  # what training will do to the data, said once (not per process)
        print(dataset.summary(), flush=True)
    examples = dataset.examples
    t_start = time.time()
    trainer = tr.Trainer(cfg, out, examples, adapter=adapter, resume=resume)
    trainer.acc.wait_for_everyone()  # every process has checked the folder before the main one writes into it
    if trainer.main:
        if out.exists() and overwrite and not resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    trainer.acc.wait_for_everyone()
    trainer.prepare()
    timing = run_loop(trainer, callback)
    weights = None
    summary: dict[str, Any] = {}
    if trainer.main:
        weights = _save_final(trainer)
        summary = _summary(trainer, timing, time.time() - t_start, weights)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(format_summary(summary))
    trainer.acc.wait_for_everyone()
    return Result(out, trainer.step, [r["loss"] for r in trainer.history], weights, summary, trainer.history)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def run_loop(trainer: Any, callback: Callable[[Any, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train to max_steps with progress bar, TensorBoard, checkpoints, interval samples; returns timing info."""
    from tqdm.auto import tqdm

    from dopsd import checkpoint as ckpt
    from dopsd.trainer import TrainingAborted

    cfg, out, main = trainer.cfg, trainer.out, trainer.main
    writer = None
    if main and cfg.log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "logs"))
    losses_file = out / "losses.jsonl"
    if main:  # the trace restarts from the checkpoint's history (a killed run may have logged further)
        losses_file.write_text("".join(json.dumps(r) + "\n" for r in trainer.history))
    bar = tqdm(total=cfg.train.max_steps, initial=trainer.step, disable=not (main and cfg.log.progress),
               desc=f"{cfg.method.name} {cfg.model.family}", unit="step", dynamic_ncols=True)
    samples: dict[str, Any] = {}
    try:
        if trainer.step == 0 and main:
            samples = trainer.sample_grids("step-0000000", writer)
        every, ck = cfg.sample.every, cfg.train.checkpoint_every
        t0, first = time.time(), trainer.step
        while trainer.step < cfg.train.max_steps:
            record = trainer.train_step()
            trainer.history.append({k: v for k, v in record.items() if not k.startswith("rollout/")})
            if callback is not None:
                callback(trainer, record)
            if main:
                append_jsonl(losses_file, record)
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
                    last = ckpt.latest(out / "checkpoints")
                    raise TrainingAborted(
                        f"{trainer.nonfinite} non-finite steps in a row (train.max_nonfinite); training stopped at step "
                        f"{trainer.step}. Last good checkpoint: {last or 'none'}. Lower optim.lr or check the data."
                    )
                continue  # never checkpoint inside a bad streak
            done = trainer.step == cfg.train.max_steps
            if (ck and trainer.step % ck == 0) or done:
                trainer.save_checkpoint()
            if every and trainer.step % every == 0 and not done and main:
                samples = trainer.sample_grids(f"step-{trainer.step:07d}", writer)
        trainer.acc.wait_for_everyone()
        steps_done = trainer.step - first
        seconds = time.time() - t0
        if main:
            samples = trainer.sample_grids("final", writer)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return {"steps_this_run": steps_done, "loop_seconds": seconds, "samples": samples}


def _save_final(trainer: Any) -> Path:
    from dopsd.sample import save_trained

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


def _summary(trainer: Any, timing: dict[str, Any], wall: float, weights: Path) -> dict[str, Any]:
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
        "weights": str(weights), "samples": {k: v for k, v in timing["samples"].items() if k.startswith("grid_")},
        "health": {k: v for k, v in (timing["samples"].get("health") or {}).items() if isinstance(v, float)},
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
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
