"""The app's home folder: where datasets, runs, probes, comparisons, exports and reports live, and the one
place that turns names and relative paths from requests into paths (never outside the home).

    HOME/datasets/NAME/      image + .txt pairs (ordinary dataset folders: `dopsd train data.path=…` reads them)
    HOME/runs/NAME/          run folders (train.output_dir)
    HOME/configs/NAME.yaml   the config file the app wrote for a run or probe
    HOME/probes/NAME/        `dopsd probe --out` folders (probe.json, probe_grid.png)
    HOME/compare/ID/         `dopsd sample` grids of a comparison + compare.json
    HOME/exports/RUN/        `dopsd export` outputs
    HOME/reports/NAME/       `dopsd bench --out` / `dopsd demo --out` folders
    HOME/trash/              dataset files removed in the app (moved, never deleted)
    HOME/.ui/                the app's own state: jobs.json, settings.json, datasets.json, logs/
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SERVED = ("datasets", "runs", "probes", "compare", "exports", "reports")  # the only folders /files/ serves
AREAS = SERVED + ("configs", "trash")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PathRefused(ValueError):
    """A name or path from a request that does not stay inside the home (or is not a valid name)."""


def check_name(name: str, what: str = "name") -> str:
    """A folder/file name a user may choose: letters, digits, '.', '_', '-'; no leading dot; ≤ 64 characters."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise PathRefused(f"{what} {name!r}: use 1–64 letters, digits, '.', '_' or '-' (not starting with '.' or '-')")
    return name


def inside(root: Path, path: Path) -> bool:
    """True when `path` (symlinks resolved) lies inside `root` (symlinks resolved)."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


class Home:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        for area in AREAS:
            (self.root / area).mkdir(parents=True, exist_ok=True)
        self.state = self.root / ".ui"
        (self.state / "logs").mkdir(parents=True, exist_ok=True)

    def area(self, area: str) -> Path:
        if area not in AREAS:
            raise PathRefused(f"unknown area {area!r}")
        return self.root / area

    def item(self, area: str, name: str, what: str = "name") -> Path:
        """HOME/AREA/NAME for a checked name (it may not exist yet); refuses symlinks that point out of the home."""
        path = self.area(area) / check_name(name, what)
        if path.is_symlink() and not inside(self.root, path):
            raise PathRefused(f"{area}/{name} points outside the app's home")
        return path

    def resolve_served(self, relative: str) -> Path:
        """The file for a /files/ request: relative to the home, inside one of the served areas, a regular file,
        no '..' or absolute parts, and (symlinks resolved) still inside that area. Raises PathRefused."""
        if not relative or "\x00" in relative or "\\" in relative:
            raise PathRefused("bad path")
        parts = relative.split("/")
        if relative.startswith("/") or any(p in ("", ".", "..") for p in parts) or re.match(r"^[A-Za-z]:", relative):
            raise PathRefused("bad path")
        if parts[0] not in SERVED or len(parts) < 2:
            raise PathRefused("not a served folder")
        path = self.root.joinpath(*parts)
        if not inside(self.root / parts[0], path):
            raise PathRefused("outside the app's home")
        if not path.is_file():
            raise FileNotFoundError(relative)
        return path

    def relative(self, path: Path) -> str:
        """The /files/ path of a file inside the home."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def fresh_name(self, area: str, base: str) -> str:
        """`base`, or `base-2`, `base-3`, … whichever does not exist yet in the area (nothing is overwritten)."""
        check_name(base)
        name, n = base, 1
        folder = self.area(area)
        configs = self.root / "configs"
        while (folder / name).exists() or (configs / f"{area}-{name}.yaml").exists():
            n += 1
            name = f"{base}-{n}"
        return name
