"""The end of a training session: the run's final weights and what summary.json says about it (the file itself,
its name and how `dopsd train` prints it: dopsd.runs.folder)."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from dopsd.lora.trained import save_trained
from dopsd.runs.checkpoint import last_good
from dopsd.runs.folder import CHECKPOINTS, STATUS_OK, STATUS_UNHEALTHY
from dopsd.runs.folder import write_summary as write_summary_file
from dopsd.training.continual import lineage


def save_final(trainer: Any, state: dict[str, Any] | None = None) -> Path:
    """The trained weights (lora.safetensors + lora_config.json, or model.safetensors: `state`, the trainer's
    final_state, when given); returns their path. For
    Z-Image and FLUX.2, lora.safetensors is itself in the layout diffusers and ComfyUI load (dopsd.lora.trained),
    so no second copy is written. The file's metadata names the trigger word and the run (its title)."""
    cfg, out = trainer.cfg, trainer.out
    meta = {
        "family": cfg.model.family,
        "model": cfg.to_dict()["model"],
        "prompts": trainer.prompts,
        "steps": trainer.step,
        "method": cfg.method.name,
        "trigger_word": cfg.data.trigger_word,
        "title": Path(out).resolve().name,
        "lineage": lineage_of(trainer),
    }
    lora = None
    if cfg.lora.enabled:
        targets = cfg.lora.targets or trainer.adapter.default_lora_targets()
        lora = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": targets}
    return save_trained(out, trainer.network, lora, meta, state=state)


def lineage_of(trainer: Any) -> list[dict[str, Any]]:
    return lineage(getattr(trainer, "init", None))


def build_summary(
    trainer: Any,
    *,
    status: str,
    problem: str | None,
    weights: Path | None,
    latest: dict[str, Any],
    wall: float,
    steps_this_run: int,
    loop_seconds: float,
) -> dict[str, Any]:
    """summary.json: what was trained, on what, for how long, with which result. `latest`: the last sampling's
    result (grid paths and the few-step health)."""
    cfg = trainer.cfg
    n_params = sum(p.numel() for p in trainer.trainable.values())
    losses = [r["loss"] for r in trainer.history if not r.get("skipped")]
    teacher = any(t.teacher for t in trainer.terms)
    good = last_good(trainer.out / CHECKPOINTS)
    model = trainer.adapter.kind or cfg.model.pretrained
    return {
        "status": status,
        "problem": problem,
        "what": f"{cfg.method.name} on {cfg.model.family} ({model}), "
        + (f"LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "full fine-tune")
        + (f", teacher {cfg.method.teacher}" if teacher else ""),
        "method": cfg.method.name,
        "teacher": cfg.method.teacher if teacher else None,
        "family": cfg.model.family,
        "pretrained": cfg.model.pretrained,
        "trainable_parameters": n_params,
        "data": {
            "path": cfg.data.path,
            "images": len(trainer.examples),
            "captions": sum(len(e.captions) for e in trainer.examples),
        },
        "steps": trainer.step,
        "steps_this_run": steps_this_run,
        "global_batch": trainer.global_batch,
        "processes": trainer.world,
        "device": str(trainer.acc.device),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "seconds_total": round(wall, 2),
        "seconds_loop": round(loop_seconds, 2),
        "steps_per_second": round(steps_this_run / loop_seconds, 3) if loop_seconds > 0 else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "skipped_steps": sum(1 for r in trainer.history if r.get("skipped")),
        "cache": {"hits": trainer.cache.hits, "misses": trainer.cache.misses},
        "resumed_from": str(trainer.resumed.path) if trainer.resumed else None,
        # continual tuning: the runs this one builds on, oldest first ({from, mode, steps, method, weights})
        "lineage": lineage_of(trainer),
        "weights": str(weights) if weights else None,
        "samples": {k: v for k, v in latest.items() if k.startswith("grid_")},
        "health": {
            k: v for k, v in (latest.get("health") or {}).items() if isinstance(v, (float, bool, str)) or v is None
        },
        "health_step": (trainer.last_health or {}).get("step"),  # when `health` was measured
        "last_good_checkpoint": str(good) if good else None,
        "replaced": trainer.replaced,  # where --overwrite moved an earlier run
    }


def final_verdict(latest: dict[str, Any], weights: dict[str, Any]) -> tuple[str, str | None]:
    """ok, or unhealthy with the reason: non-finite/exploded weights (`weights`: the trainer's weights_verdict), or
    broken few-step samples at the end (`latest`: the monitor's last sampling)."""
    problems = []
    if not weights["ok"]:
        problems.append(weights["problem"])
    health = latest.get("health") or {}
    if health.get("broken"):
        problems.append(health["problem"])
    return (STATUS_UNHEALTHY, "; ".join(problems)) if problems else (STATUS_OK, None)


def write_summary(trainer: Any, monitor: Any, status: str, problem: str | None, weights: Path | None) -> dict[str, Any]:
    """summary.json of the session that ends now, and progress.json's final status; returns the summary."""
    summary = build_summary(
        trainer,
        status=status,
        problem=problem,
        weights=weights,
        latest=monitor.latest,
        wall=time.time() - trainer.started,
        steps_this_run=trainer.step - trainer.first_step,
        loop_seconds=trainer.loop_seconds,
    )
    summary["done"] = monitor.done.summary()  # the done signal's lowest step; an early stop (dopsd.training.done)
    write_summary_file(trainer.out, summary)
    monitor.progress(status)
    return summary
