"""Resumable checkpoints, written atomically and pruned to the last N.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` with
  trainable.safetensors   the student's trainable weights (LoRA matrices, or every weight when fully fine-tuned)
  teacher.safetensors     the teacher's shadow weights (EMA/base; absent for the live teacher)
  prior.safetensors       the original model's shadow for prior preservation (LoRA only; full FT reloads it)
  optimizer.pt, scheduler.pt
  rng-rank{R}.pt          python / numpy / torch RNG states of each process
  state.json              step, data-order state, loss history, non-finite counter
It is first written as `.tmp-step-NNNNNNN` and renamed when complete, so a process killed while writing
leaves the previous checkpoint intact and no half-written one that `latest()` could pick up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (renamed from their temporary name), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def temp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{PREFIX}{step:07d}"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensors(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in d.items()}


def write_rank_rng(root: Path, step: int, rank: int) -> None:
    """Every process writes its own RNG state into the temporary folder (before the main one finalises)."""
    tmp = temp_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")


def write_main(
    root: Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    teacher: dict[str, Any] | None,
    prior: dict[str, Any] | None,
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """The main process's part: weights, optimizer, scheduler, state; then stays temporary until `finalise`."""
    tmp = temp_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(trainable), str(tmp / "trainable.safetensors"))
    for name, shadow in (("teacher", teacher), ("prior", prior)):
        if shadow is not None and shadow["shadow"]:
            save_file(_tensors(shadow["shadow"]), str(tmp / f"{name}.safetensors"),
                      metadata={"mode": shadow["mode"], "decay": str(shadow["decay"])})
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(scheduler, tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps(state))


def finalise(root: Path, step: int, keep: int) -> Path:
    """Rename the complete temporary folder into place (atomic) and prune to the last `keep`."""
    tmp, final = temp_dir(root, step), checkpoint_dir(root, step)
    if final.exists():  # same step written again (e.g. resumed at the last checkpoint): replace it
        shutil.rmtree(final)
    _fsync_dir(tmp)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):  # leftovers of a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def load_shadow(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    return {"mode": meta.get("mode"), "decay": float(meta.get("decay", "0")), "shadow": load_file(str(path))}


def read(path: Path, rank: int) -> dict[str, Any]:
    """Everything in a checkpoint folder (this process's RNG state; rank 0's if it has none)."""
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng-rank0.pt"
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "teacher": load_shadow(path / "teacher.safetensors"),
        "prior": load_shadow(path / "prior.safetensors"),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=False),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=False),
        "rng": torch.load(rng_file, weights_only=False),
        "state": json.loads((path / "state.json").read_text()),
    }
