"""Atomic file writes: a reader (or a crash) never sees half a file, and nothing is replaced until the new
content is on disk.

Every file dopsd hands to a user or reads back later (weights, exports, summaries, checkpoints) goes through
here: write a temporary file beside the target, fsync it, rename it over the target, fsync the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, TextIO


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in `folder` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to produce the file at a temporary name, then fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_for(path)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def replace_and_keep_open(path: str | Path, text: str) -> TextIO:
    """Write `text` at a temporary name, fsync, rename it over `path` and return the still-open file, now `path`:
    later writes go on through the same handle (a trace's appends), never through a second open by name."""
    path = Path(path)
    tmp = _temp_for(path)
    fh = open(tmp, "w", encoding="utf-8")
    try:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        fh.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return fh


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_save_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def atomic_save_image(path: str | Path, image: Any) -> Path:
    """A PIL image, format from the target's suffix."""
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))
