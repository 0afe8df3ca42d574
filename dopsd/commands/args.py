"""Command-line flag values, checked before any model loads.

Single values are argparse types (`count`, `seed`, `finite`, `fraction`): argparse then names the flag and
exits 2 with the usage line. Checks that need the file system or several flags (output paths, run folders,
devices) raise `UsageError` / `RunFolderError` from the command's `main`, still before anything is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from dopsd.config import SEED_LIMIT  # the same seed range as the config's
from dopsd.errors import RunFolderError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# --- argparse types: one value each ---------------------------------------------------------------------
def count(minimum: int = 1):
    """An integer >= `minimum` (steps, seeds, prompts …)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def seed(text: str) -> int:
    """A seed in [0, 2^32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is a whole number in [0, 2^32), got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2^32), got {value}")
    return value


def finite(text: str) -> float:
    """A finite number (no nan/inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A finite number in [0, 1]."""
    value = finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
    return value


# --- checks that look at the file system ----------------------------------------------------------------
def run_source(source: str) -> tuple[Path | None, str | Path]:
    """(run folder or None, what load_config reads) for a command's SOURCE: a run folder, a YAML file or a preset."""
    path = Path(source)
    if not path.is_dir():
        return None, source
    if not (path / "config.yaml").is_file():
        raise RunFolderError(
            f"{path} is a folder but not a dopsd run folder (it has no config.yaml); give a run "
            "folder that `dopsd train` wrote, a YAML config or a preset name"
        )
    return path, path / "config.yaml"


def _writable_folder(flag: str, folder: Path, target: Path) -> None:
    """`folder` (where `target` goes) exists as a writable folder or can be created: its nearest existing
    parent is one."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {target}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {target}: cannot write into {existing} (permission denied); choose another path")


def output_file(flag: str, path: Path, overwrite: bool, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Path:
    """An image file to write: not a folder, a known extension, writable, and replaced only with --overwrite."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name such as {path / ('samples' + suffixes[0])}")
    if path.suffix.lower() not in suffixes:
        raise UsageError(
            f"{flag} {path}: the image format follows the extension; end the name in {', '.join(suffixes)}"
        )
    if path.exists() and not overwrite:
        raise UsageError(f"{flag} {path} already exists; choose another name, or pass --overwrite to replace it")
    _writable_folder(flag, path.parent, path)
    return path


def output_folder(flag: str, path: Path, ours: str) -> Path:
    """A folder for a command's report: new, empty, or holding only files the command writes (names matching
    the regular expression `ours`: an earlier report, then replaced). A folder holding anything else is refused,
    so a report never lands among (or replaces) someone's files."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a folder for the report")
    if path.is_dir():
        leftover = r"\..+\.\d+\.tmp"  # a temporary file of dopsd.files from a write that was killed
        others = sorted(p.name for p in path.iterdir() if not re.fullmatch(f"{ours}|{leftover}", p.name))
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise UsageError(
                f"{flag} {path} already holds files this report does not write ({shown}); choose a new or empty folder"
            )
    _writable_folder(flag, path, path)
    return path


def device(flag: str, name: str | None):
    """The torch device to use: `name`, or cuda when available, else cpu; refused when not usable here."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: CUDA is not available on this machine; use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {name}: MPS is not available on this machine; use {flag} cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {name}: dopsd runs on cpu, cuda or mps")
    return dev
