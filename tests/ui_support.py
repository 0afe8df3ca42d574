"""Helpers shared by the `dopsd ui` tests: an app context on a fresh home, waiting, small real images, and a
run folder holding a (small, random) Z-Image LoRA as `dopsd train` would leave it, for export tests."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any, Callable

from PIL import Image

HEADERS = {"x-dopsd-request": "1"}
# A short miniature run: every sampling/checkpoint interval comes quickly, 1 CPU thread per job (conftest's rule).
FAST_RUN = {
    "train.max_steps": 12,
    "sample.every": 4,
    "sample.control_steps": 8,
    "train.checkpoint_every": 2,
    "data.trigger_word": "sks",
}


def make_ctx(home: Path, max_jobs: int = 1, grace: float = 60.0) -> Any:
    """A stopped run finishes its step and checkpoints it before it exits (seconds on a busy CPU): `grace` leaves it
    the time, as `dopsd ui --grace` does."""
    from dopsd.ui import build

    return build(home, max_jobs=max_jobs, threads=1, grace=grace)


def close_ctx(ctx: Any) -> None:
    """Stop every job the test left running (by its own records), then the watcher."""
    for job in ctx.jobs.list():
        if job.status in ("queued", "running", "stopping"):
            ctx.jobs.stop(job.id)
    deadline = time.time() + 90
    while time.time() < deadline and any(j.status in ("running", "stopping") for j in ctx.jobs.list()):
        ctx.jobs.tick()
        time.sleep(0.2)
    ctx.jobs.shutdown()
    ctx.fit.close()


def wait_for(check: Callable[[], Any], timeout: float = 120.0, every: float = 0.3, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def png_bytes(
    size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 120, 30), fmt: str = "PNG"
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_zimage_lora_run(folder: Path, rank: int = 4, dim: int = 16) -> Path:
    """A run folder with lora.safetensors (Z-Image module names, peft keys) and lora_config.json — the files
    `dopsd export` reads. The weights are random: export converts names and scales, it needs no model."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    modules = ["layers.0.attention.to_q", "layers.0.attention.to_k", "layers.1.feed_forward.w1"]
    state = {}
    for m in modules:
        state[f"{m}.lora_A.weight"] = torch.randn(rank, dim, generator=g)
        state[f"{m}.lora_B.weight"] = torch.randn(dim, rank, generator=g)
    save_file(state, str(folder / "lora.safetensors"), metadata={"format": "dopsd-lora"})
    (folder / "lora_config.json").write_text(
        json.dumps({"format": "dopsd-lora", "rank": rank, "alpha": 8.0, "targets": modules, "family": "zimage"})
    )
    (folder / "config.yaml").write_text("preset: zimage-turbo\nmodel: {family: zimage}\ntrain: {max_steps: 3}\n")
    (folder / "summary.json").write_text(json.dumps({"status": "ok", "steps": 3, "method": "dopsd"}))
    return folder
