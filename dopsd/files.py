"""Atomic file writes: a reader (or a crash) never sees half a file, and nothing is replaced until the new
content is on disk.

Every file dopsd hands to a user or reads back later (weights, exports, summaries, checkpoints) goes through
here: write a temporary file beside the target, fsync it, rename it over the target, fsync the folder.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, TextIO

from dopsd.errors import NoSpaceError

# Full disk and exhausted quota. Libraries that write through their own code (safetensors' Rust writer) report it
# in their message only: "No space left on device (os error 28)".
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def disk_full(err: BaseException) -> bool:
    """Whether `err` (an OSError, or a library's error wrapping one) says the device or the quota is full."""
    if isinstance(err, NoSpaceError):
        return True
    if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
        return True
    return isinstance(err, Exception) and any(text in str(err) for text in NO_SPACE_TEXT)


def no_space(path: str | Path, err: BaseException | None = None) -> NoSpaceError:
    """The error for a write to `path` that found its device full: names the device's folder and its free space."""
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    quota = " (or your disk quota is used up)" if isinstance(err, OSError) and err.errno == errno.EDQUOT else ""
    return NoSpaceError(f"no space left on the device holding {folder}{quota} ({free} now)", str(folder))


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


def file_mode() -> int:
    """The mode a new file gets from open(): 0o666 less the process's umask (0o644 under umask 022)."""
    try:  # Linux tells the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def respect_umask(path: str | Path) -> None:
    """Give a file written by a library that creates it owner-only (safetensors' writer: 0600) the mode any other
    new file gets, so a LoRA copied into a shared folder (a ComfyUI install, a team drive) can be read there."""
    try:
        os.chmod(path, file_mode())
    except OSError:  # a filesystem without modes (some network or FAT mounts): its own rules apply
        pass


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to produce the file at a temporary name, then fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_for(path)
    try:
        write(tmp)
        respect_umask(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)  # the target is untouched; the partial file would only hold on to the space
        if disk_full(err) and not isinstance(err, NoSpaceError):
            raise no_space(path, err) from err
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
    except BaseException as err:
        fh.close()
        tmp.unlink(missing_ok=True)
        if disk_full(err) and not isinstance(err, NoSpaceError):
            raise no_space(path, err) from err
        raise
    fsync_dir(path.parent)
    return fh


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def save_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """safetensors' save_file with the umask's mode; not atomic by itself (for files inside a folder that is
    renamed into place whole, such as a checkpoint)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    respect_umask(path)
    return Path(path)


def atomic_save_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def atomic_save_image(path: str | Path, image: Any) -> Path:
    """A PIL image, format from the target's suffix."""
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))
