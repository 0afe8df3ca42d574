"""Setup helpers and command stems of the bad-input cases (tests/bad_input_cases.py): each helper returns a
Setup(case folder, assets folder) that writes or breaks files in the case's fresh folder before its command runs.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from bad_inputs import Setup, own
from PIL import Image

STEP = "run/checkpoints/step-0000002"


def text(rel: str, content: str) -> Setup:
    def setup(w: Path, a: Path) -> None:
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(content)

    return setup


def raw(rel: str, data: bytes) -> Setup:
    def setup(w: Path, a: Path) -> None:
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_bytes(data)

    return setup


def image(rel: str, size: tuple[int, int] = (24, 24), mode: str = "RGB", caption: str | None = "a red circle") -> Setup:
    def setup(w: Path, a: Path) -> None:
        path = w / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)

    return setup


def truncate(rel: str, keep: float = 0.5, own_asset: str | None = None) -> Setup:
    """Keep the first `keep` fraction of a file (an asset named by `own_asset` is copied first)."""

    def setup(w: Path, a: Path) -> None:
        if own_asset:
            own(w, a, own_asset)
        data = (w / rel).read_bytes()
        (w / rel).write_bytes(data[: int(len(data) * keep)])

    return setup


def remove(rel: str, own_asset: str | None = None) -> Setup:
    def setup(w: Path, a: Path) -> None:
        import shutil

        if own_asset:
            own(w, a, own_asset)
        target = w / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return setup


def both(*setups: Setup) -> Setup:
    def setup(w: Path, a: Path) -> None:
        for s in setups:
            s(w, a)

    return setup


def metadata(lines: list[str]) -> Setup:
    """A metadata.jsonl dataset `meta/` with two good images and the given lines."""
    return both(
        image("meta/a.png", caption=None),
        image("meta/b.png", caption=None),
        text("meta/metadata.jsonl", "\n".join(lines) + "\n"),
    )


class _Planted:
    """A pickle that, when loaded, creates the file PLANTED: loading it would run someone else's code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_pickle(w: Path, a: Path) -> None:
    """Every checkpoint in the old pickle format, its optimizer state a pickle that would run code when loaded."""
    for step in (w / "run" / "checkpoints").glob("step-*"):
        (step / "optimizer.safetensors").unlink()
        (step / "optimizer.pt").write_bytes(pickle.dumps(_Planted(w / "PLANTED")))


def truncated_checkpoints(w: Path, a: Path) -> None:
    """Every checkpoint's weights cut in half (a single bad checkpoint is skipped for the one before it)."""
    for file in (w / "run" / "checkpoints").glob("step-*/trainable.safetensors"):
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


_HELD: list = []  # the lock of the case that holds one (released when the next such case starts)


def hold_run_lock(w: Path, a: Path) -> None:
    """Hold the lock of run/ as a training process would (without recording a pid: the message stays the same)."""
    from dopsd.runs import folder as rundir
    from dopsd.runs import lock as runlock

    while _HELD:
        _HELD.pop().release()
    (w / "run" / rundir.OWNER_LOCK).write_text("")  # no holder details: the message stays the same on every run
    _HELD.append(runlock.lock_as_owner(w / "run", record=False))


def int32_image(rel: str) -> Setup:
    """A 32-bit integer image whose values exceed 16 bits: no known range to scale it from."""

    def setup(w: Path, a: Path) -> None:
        path = w / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("I", (24, 24), 1_000_000).save(path)
        path.with_suffix(".txt").write_text("a red circle")

    return setup


def lora_config(change: dict) -> Setup:
    def setup(w: Path, a: Path) -> None:
        path = w / "run" / "lora_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))

    return setup


# Command stems the cases share.
TRAIN = "train mini data.path=data"
SAMPLE = "sample mini --prompt 'a red circle'"
Z = "model.pretrained=zimage model.height=32 model.width=32 model.dtype=float32"
RUNX = "train.output_dir=run2 model.pretrained=tiny train.max_steps=1 log.progress=false"  # fast if it ever runs
PROBE = "probe mini data.path=data model.pretrained=tiny"
EVAL = "eval run --control-steps 0 --seeds 0"
