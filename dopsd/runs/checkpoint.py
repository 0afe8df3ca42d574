"""Resumable checkpoints, written atomically and pruned to the last N; nothing in them is loaded with pickle.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` with
  trainable.safetensors    the student's trainable weights (LoRA matrices, or every weight when fully fine-tuned)
  teacher.safetensors      the teacher's shadow weights (EMA/base; absent for the live teacher)
  prior.safetensors        the original model's shadow for prior preservation (LoRA only; full FT reloads it)
  optimizer.safetensors    the optimizer's state dict, scheduler.safetensors the LR scheduler's, and
  rng-rank{R}.safetensors  the python / numpy / torch (/ CUDA) RNG states of each process: each a "state file"
                           (`save_state`): its tensors as safetensors, everything else as JSON in the metadata
  state.json               step, data order, loss history, non-finite counter, processes, global batch, the
                           dataset's identity, and whether the checkpoint is good (`good`, `weights`, `health`)
It is first written as `.tmp-step-NNNNNNN` and renamed when complete (then the folder is fsynced), so a process
killed while writing leaves the previous checkpoint intact and no half-written one that `list_checkpoints` lists.
Checkpoints of dopsd versions that stored the optimizer and RNG states with pickle (`*.pt`) are refused: loading
a pickle can run arbitrary code.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from dopsd.errors import CheckpointError
from dopsd.files import atomic_write_text, fsync_dir, save_safetensors

PREFIX = "step-"
STATE_KEY = "dopsd.state"  # safetensors metadata entry holding a state file's JSON structure
STATE_FILES = ("optimizer.safetensors", "scheduler.safetensors")
PICKLED = ("optimizer.pt", "scheduler.pt", "rng-rank0.pt")


# --- state files: a state dict as safetensors + JSON, never pickle --------------------------------------------
def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        t = value.detach()
        tensors[key] = t.to("cpu").contiguous() if t.device.type != "cpu" else t.contiguous().clone()
        return {"__tensor__": key, "device": t.device.type}
    if isinstance(value, np.ndarray):  # numpy's RNG key (uint32): exact as int64
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(value.astype(np.int64))
        return {"__ndarray__": key, "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, where) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, where) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, where)] for k, v in value.items()]}
    raise CheckpointError(
        f"{where}: a {type(value).__name__} in this state cannot be stored without pickle; "
        "this optimizer/scheduler cannot be checkpointed by dopsd (use the default AdamW)"
    )


def _decode(node: Any, tensors: dict[str, torch.Tensor], device: torch.device | None) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, device) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        t = tensors[node["__tensor__"]]
        return t.to(device) if node.get("device", "cpu") != "cpu" and device is not None else t
    if "__ndarray__" in node:
        return tensors[node["__ndarray__"]].numpy().astype(node["dtype"])
    if "__tuple__" in node:
        return tuple(_decode(v, tensors, device) for v in node["__tuple__"])
    if "__items__" in node:
        return {_decode(k, tensors, device): _decode(v, tensors, device) for k, v in node["__items__"]}
    return {k: _decode(v, tensors, device) for k, v in node.items()}


def save_state(path: Path, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, str(path))
    save_safetensors(path, tensors, metadata={STATE_KEY: json.dumps(tree)})


def load_state(path: Path, device: torch.device | None = None) -> Any:
    """A state file back as python objects; tensors saved from an accelerator go to `device`."""
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if STATE_KEY not in meta:
        raise ValueError(f"no {STATE_KEY} entry in its metadata")
    return _decode(json.loads(meta[STATE_KEY]), tensors, device)


# --- where checkpoints are ----------------------------------------------------------------------------------
def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:07d}"


def temp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{PREFIX}{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (renamed from their temporary name), oldest first."""
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / "state.json").is_file()
    ]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def is_good(path: Path) -> bool:
    """Written with finite, sane weights and few-step health measured at its step and not broken."""
    state = read_state(path)
    return bool(state and state.get("good"))


def amend(path: Path, *, health: dict[str, Any], broken: bool) -> None:
    """Record a health measurement of this checkpoint's weights taken after it was written."""
    state = read_state(path)
    if state is not None:
        state["health"] = health
        state["good"] = bool(state.get("weights", {}).get("ok")) and not broken
        atomic_write_text(path / "state.json", json.dumps(state))


def last_good(root: Path) -> Path | None:
    return next((p for p in reversed(list_checkpoints(root)) if is_good(p)), None)


def old_format(path: Path) -> bool:
    return not (path / STATE_FILES[0]).is_file() and any((path / name).is_file() for name in PICKLED)


# --- writing ------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


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
    save_state(tmp / f"rng-rank{rank}.safetensors", rng_state())


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
    lora_metadata: dict[str, str] | None = None,
) -> None:
    """The main process's part: weights, optimizer, scheduler, state; then stays temporary until `finalise`."""
    tmp = temp_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    # lora_metadata (dopsd.lora.meta.checkpoint_metadata): the LoRA's rank and alpha, so another tool that loads
    # these LoRA-keyed files applies them at the strength they were trained at
    save_safetensors(tmp / "trainable.safetensors", _tensors(trainable), metadata=lora_metadata)
    for name, shadow in (("teacher", teacher), ("prior", prior)):
        if shadow is not None and shadow["shadow"]:
            save_safetensors(
                tmp / f"{name}.safetensors",
                _tensors(shadow["shadow"]),
                metadata={**(lora_metadata or {}), "mode": shadow["mode"], "decay": str(shadow["decay"])},
            )
    save_state(tmp / "optimizer.safetensors", optimizer)
    save_state(tmp / "scheduler.safetensors", scheduler)
    (tmp / "state.json").write_text(json.dumps(state))


def finalise(root: Path, step: int, keep: int) -> Path:
    """Rename the complete temporary folder into place (atomic, then durable) and prune to the last `keep`."""
    tmp, final = temp_dir(root, step), checkpoint_dir(root, step)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    old = root / f".old-{final.name}"
    if final.exists():  # same step written again (e.g. resumed at the last checkpoint): swap, then drop the old
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    for gone in list_checkpoints(root)[:-keep]:
        shutil.rmtree(gone, ignore_errors=True)
    for stale in [*root.glob(f".tmp-{PREFIX}*"), *root.glob(f".old-{PREFIX}*")]:  # leftovers of a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    return final


# --- reading ------------------------------------------------------------------------------------------------
def load_shadow(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    return {"mode": meta.get("mode"), "decay": float(meta.get("decay", "0")), "shadow": load_file(str(path))}


def _read_file(path: Path, read: Any) -> Any:
    try:
        return read(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (incomplete checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, RuntimeError) as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err})") from None


def read(path: Path, rank: int, device: torch.device | None = None) -> dict[str, Any]:
    """Everything in a checkpoint folder (this process's RNG state; rank 0's if it has none). Raises
    CheckpointError naming the file that is missing, unreadable, or in the old pickle format."""
    if old_format(path):
        raise CheckpointError(
            f"{path} was written by an earlier dopsd version that stored the optimizer and RNG state with pickle "
            f"({', '.join(n for n in PICKLED if (path / n).is_file())}); dopsd no longer loads pickle files, since "
            "loading one can run arbitrary code. Start a new run (the weights of that checkpoint are in its "
            "trainable.safetensors)"
        )
    rng_file = path / f"rng-rank{rank}.safetensors"
    if not rng_file.is_file():
        rng_file = path / "rng-rank0.safetensors"
    state = _read_file(path / "state.json", lambda p: json.loads(p.read_text()))
    return {
        "trainable": _read_file(path / "trainable.safetensors", lambda p: load_file(str(p))),
        "teacher": _read_file(path / "teacher.safetensors", load_shadow),
        "prior": _read_file(path / "prior.safetensors", load_shadow),
        "optimizer": _read_file(path / "optimizer.safetensors", lambda p: load_state(p, device)),
        "scheduler": _read_file(path / "scheduler.safetensors", lambda p: load_state(p, device)),
        "rng": _read_file(rng_file, lambda p: load_state(p, device)),
        "state": state,
    }


# --- is a checkpoint good, and does it fit this run ------------------------------------------------------
WEIGHT_LIMIT = 1e3  # a trained weight beyond max(this, 100 × the largest starting weight) has diverged


def weights_verdict(trainable: dict[str, torch.Tensor], start_max: float) -> dict[str, Any]:
    """{'finite', 'max_abs', 'ok', 'problem'} of the trainable weights now. Trained weights stay within a small
    multiple of the starting ones; values far beyond (or non-finite) mean the optimizer diverged."""
    with torch.no_grad():
        finite = all(bool(torch.isfinite(p).all()) for p in trainable.values())
        max_abs = max((float(p.detach().abs().max()) for p in trainable.values() if p.numel()), default=0.0)
    return verdict(finite, max_abs, start_max)


def verdict(finite: bool, max_abs: float, start_max: float) -> dict[str, Any]:
    """weights_verdict from its two measurements (sharded weights measure them per process, then combine)."""
    limit = max(WEIGHT_LIMIT, 100.0 * start_max)
    problem = None
    if not finite:
        problem = "the trained weights are not finite (NaN/inf)"
    elif max_abs > limit:
        problem = f"the trained weights exploded (largest |w| {max_abs:.3g}, limit {limit:.3g})"
    return {"finite": finite, "max_abs": max_abs if finite else None, "ok": problem is None, "problem": problem}


def dataset_identity(examples: list[Any]) -> dict[str, Any]:
    """What a resumed run must train on: each example's image content (and sources) and captions."""
    import hashlib

    per = {}
    for ex in examples:
        text = json.dumps([ex.digest, list(ex.captions), list(ex.bucket)])
        per[ex.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    total = hashlib.sha256(json.dumps(sorted(per.items())).encode()).hexdigest()
    return {"sha256": total, "images": len(examples), "examples": per}


def check_fits(
    path: Path, state: dict[str, Any], *, dataset: dict[str, Any], processes: int, global_batch: int
) -> list[str]:
    """Refuse a checkpoint made on other data or with another global batch; returns notes on harmless changes."""
    saved = state.get("dataset")
    if saved and saved.get("sha256") != dataset["sha256"]:
        old, new = saved.get("examples", {}), dataset["examples"]
        changed = [n for n in new if n in old and old[n] != new[n]]
        parts = [
            f"{label}: {', '.join(sorted(names)[:5])}{' …' if len(names) > 5 else ''}"
            for label, names in (
                ("changed", changed),
                ("added", [n for n in new if n not in old]),
                ("removed", [n for n in old if n not in new]),
            )
            if names
        ]
        raise CheckpointError(
            f"--resume: data.path holds other data than the run in {path.parent.parent} trained on "
            f"({saved.get('images')} → {dataset['images']} images; {'; '.join(parts) or 'captions changed'}). "
            "Resume with the same images and captions, or start a new run"
        )
    notes = []
    was_batch, was_world = state.get("global_batch"), state.get("processes", state.get("world"))
    if was_batch is not None and was_batch != global_batch:
        raise CheckpointError(
            f"--resume: {path} was trained with a global batch of {was_batch} ({was_world} process(es)); this start "
            f"has {global_batch} ({processes} process(es) × train.batch_size × train.gradient_accumulation). "
            f"Resume with {was_world} process(es), or set train.batch_size / train.gradient_accumulation so the "
            f"global batch is {was_batch} again"
        )
    if was_world is not None and was_world != processes:
        # The data order and every per-sample random draw are keyed by the slot in the global batch, so the
        # same global batch trains on the same samples; only float summation order and LoRA dropout (each
        # process's own generator) differ.
        notes.append(
            f"resuming a {was_world}-process run with {processes} process(es) and the same global batch "
            f"({global_batch}): the same samples and noise, but not bit-identical to an uninterrupted run"
        )
    return notes


def load_for_resume(
    root: Path, rank: int, device: torch.device | None = None
) -> tuple[Path, dict[str, Any], list[str]]:
    """(checkpoint, its contents, notes): the latest checkpoint, or if it cannot be read, the newest good one
    that can (the notes say which file was broken and what was used instead)."""
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"--resume: {root} holds no complete checkpoint; start a new run (without --resume)")
    problems = []
    for i, path in enumerate(reversed(found)):
        if i > 0 and (read_state(path) or {}).get("good") is False:  # unmeasured ones (health off) are tried
            problems.append(f"{path.name} is not a good checkpoint (weights or health were bad when it was written)")
            continue
        try:
            data = read(path, rank, device)
        except CheckpointError as err:
            if old_format(path):
                raise
            problems.append(str(err))
            continue
        notes = [f"{'; '.join(problems)}; resuming from {path} instead"] if problems else []
        return path, data, notes
    raise CheckpointError(f"--resume: no usable checkpoint in {root}: {'; '.join(problems)}")
