"""Datasets in the app: ordinary folders of image + .txt caption pairs under HOME/datasets (what `dopsd train
data.path=…` reads), checked with the same dataset check `dopsd train` runs before anything starts.

Uploads are refused unless the image passes that check on its own (full decode with Pillow, minimum size for the
chosen preset); nothing is overwritten (a name in use gets a -2, -3 … suffix) and removing a pair moves it to
HOME/trash/, never deletes it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from PIL import Image

from dopsd.ui import adapter
from dopsd.ui.home import Home, PathRefused, inside

MAX_CAPTION_BYTES = 64 * 1024


class UploadRefused(ValueError):
    def __init__(self, name: str, problems: list[str]):
        self.name, self.problems = name, problems
        super().__init__(f"{name}: " + "; ".join(problems))


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in adapter.IMAGE_EXTENSIONS


def safe_filename(raw: str) -> str:
    """The last path component of an uploaded file's name, reduced to letters, digits, '.', '_', '-'."""
    base = re.split(r"[\\/]", raw or "")[-1]
    stem, suffix = os.path.splitext(base)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:60] or "image"
    return f"{stem}{suffix.lower()}"


def listing(home: Home) -> list[dict[str, Any]]:
    out = []
    for folder in sorted(home.area("datasets").iterdir()):
        if folder.is_dir() and not folder.name.startswith("."):
            images = [p for p in folder.iterdir() if p.is_file() and is_image(p.name)]
            out.append(
                {
                    "name": folder.name,
                    "images": len(images),
                    "modified": folder.stat().st_mtime,
                    "layout": "metadata" if (folder / adapter.METADATA).is_file() else "folder",
                    **meta(home, folder.name),
                }
            )
    return out


def folder(home: Home, name: str, must_exist: bool = True) -> Path:
    path = home.item("datasets", name, "dataset name")
    if must_exist and not path.is_dir():
        raise FileNotFoundError(f"no dataset {name!r} in {home.area('datasets')}")
    return path


def create(home: Home, name: str) -> Path:
    path = folder(home, name, must_exist=False)
    if path.exists():
        raise FileExistsError(f"dataset {name!r} already exists")
    path.mkdir(parents=True)
    return path


# --- per-dataset settings the app remembers (trigger word, preset), outside the dataset folder ------------------
def _meta_file(home: Home) -> Path:
    return home.state / "datasets.json"


def meta(home: Home, name: str) -> dict[str, Any]:
    try:
        data = json.loads(_meta_file(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    return {"trigger_word": None, "preset": "mini", **(data.get(name) or {})}


def set_meta(home: Home, name: str, trigger_word: str | None, preset: str) -> dict[str, Any]:
    try:
        data = json.loads(_meta_file(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    data[name] = {"trigger_word": trigger_word or None, "preset": preset}
    adapter.atomic_write_json(_meta_file(home), data)
    return data[name]


# --- the dataset page -----------------------------------------------------------------------------------------
def view(home: Home, name: str, preset: str | None = None, trigger_word: str | None = None) -> dict[str, Any]:
    """Files, captions (raw and as trained), the dataset check's problems per file and overall, and notices."""
    path = folder(home, name)
    refuse_outside_links(home, path, name)
    settings = meta(home, name)
    preset = preset or settings["preset"]
    trigger_word = trigger_word if trigger_word is not None else settings["trigger_word"]
    check = adapter.check_dataset(path, preset, trigger_word)
    layout = "metadata" if (path / adapter.METADATA).is_file() else "folder"
    names = sorted(p.name for p in path.iterdir() if p.is_file() and is_image(p.name))
    claimed: set[int] = set()
    files = []
    for image in names:
        txt = Path(image).with_suffix(".txt").name
        mine = [i for i, p in enumerate(check["problems"]) if _about(p, image) or _about(p, txt)]
        claimed.update(mine)
        caption = None
        if layout == "folder" and (path / txt).is_file():
            caption = (path / txt).read_text(encoding="utf-8", errors="replace")
        files.append(
            {
                "name": image,
                "url": f"/files/datasets/{name}/{image}",
                "caption": caption,
                "caption_file": txt,
                "trained_as": check["examples"].get(image)
                or (
                    [adapter.trigger(line, trigger_word) for line in caption.splitlines() if line.strip()]
                    if caption
                    else []
                ),
                "size": _size(path / image),
                "problems": [check["problems"][i] for i in mine],
            }
        )
    general = [p for i, p in enumerate(check["problems"]) if i not in claimed]
    return {
        "name": name,
        "layout": layout,
        "preset": preset,
        "trigger_word": trigger_word,
        "files": files,
        "ok": check["ok"],
        "problems": general,
        "problem_count": len(check["problems"]),
        "notices": check["notices"],
        "path": str(path),
    }


def refuse_outside_links(home: Home, path: Path, name: str) -> None:
    """The dataset page reads every file of the folder (captions shown, the dataset check): a link in it that leads
    out of the app's home would hand that file's content to any page of the app, so the page is refused."""
    for entry in sorted(os.listdir(path)):
        if not inside(home.root, path / entry):
            raise PathRefused(
                f"datasets/{name}/{entry} is a link to a file outside the app's home; the app does not read it. "
                "Copy the file into the dataset folder instead, or remove the link"
            )


def _about(problem: str, filename: str) -> bool:
    """Whether a dataset-check problem is about `filename`: it starts with the name, or names it as a whole word
    in a listing (duplicate names, or captions grouped by text: `"text" (file.txt line 1, …)`)."""
    if problem.startswith(f"{filename}:") or problem.startswith(f"{filename} "):
        return True
    listed = problem.startswith("duplicate name:") or problem.startswith('"')
    return listed and re.search(rf"(?<![\w.-]){re.escape(filename)}(?![\w.-])", problem) is not None


def _size(path: Path) -> list[int] | None:
    try:
        with Image.open(path) as img:
            return list(img.size)
    except Exception:  # noqa: BLE001 - the dataset check reports unreadable images; here we only show a size
        return None


def _free_stem(path: Path, stem: str) -> str:
    """`stem`, or `stem-2`, … so that no image or caption of that stem exists yet."""
    taken = {p.stem.lower() for p in path.iterdir()}
    candidate, n = stem, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def save_upload(
    home: Home,
    name: str,
    raw_name: str,
    data: bytes,
    preset: str,
    max_bytes: int,
    captions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Keep one uploaded image (after the dataset check accepted it) and its caption, if one came with it."""
    path = folder(home, name)
    if (path / adapter.METADATA).is_file():
        raise UploadRefused(raw_name, [f"this dataset lists its images in {adapter.METADATA}; add files there"])
    filename = safe_filename(raw_name)
    if not is_image(filename):
        raise UploadRefused(raw_name, [f"not an image file (accepted: {', '.join(adapter.IMAGE_EXTENSIONS)})"])
    if len(data) > max_bytes:
        raise UploadRefused(raw_name, [f"{len(data)} bytes is over the upload limit of {max_bytes} bytes"])
    problems = adapter.check_upload(data, filename, preset)
    if problems:
        raise UploadRefused(raw_name, [p.split(": ", 1)[-1] if p.startswith(filename) else p for p in problems])
    stem = _free_stem(path, Path(filename).stem)
    target = path / f"{stem}{Path(filename).suffix}"
    adapter.atomic_write_bytes(target, data)
    caption = (captions or {}).get(upload_stem(raw_name))
    if caption is not None:
        adapter.atomic_write_text(target.with_suffix(".txt"), caption)
    return {"saved": target.name, "renamed": target.name != filename, "caption": caption is not None}


def upload_stem(raw_name: str) -> str:
    """The name an uploaded file's caption is matched by: its stem as the browser sent it."""
    return Path(re.split(r"[\\/]", raw_name)[-1]).stem


def read_caption_upload(raw_name: str, data: bytes) -> tuple[str, str]:
    if len(data) > MAX_CAPTION_BYTES:
        raise UploadRefused(raw_name, [f"caption file over {MAX_CAPTION_BYTES} bytes"])
    try:
        return upload_stem(raw_name), data.decode("utf-8")
    except UnicodeDecodeError:
        raise UploadRefused(raw_name, ["caption is not UTF-8 text"]) from None


def save_caption_for(home: Home, name: str, stem: str, text: str) -> dict[str, Any]:
    """A caption uploaded alone: kept for the dataset's image of that name if it has no caption yet."""
    path = folder(home, name)
    images = [p for p in path.iterdir() if p.is_file() and is_image(p.name) and p.stem == stem]
    if not images:
        raise UploadRefused(f"{stem}.txt", [f"no image named {stem}.* in the dataset (upload it with its caption)"])
    target = images[0].with_suffix(".txt")
    if target.exists():
        raise UploadRefused(f"{stem}.txt", [f"{target.name} exists already; edit the caption in the app"])
    adapter.atomic_write_text(target, text)
    return {"saved": target.name, "renamed": False, "caption": True}


def _existing_image(path: Path, image: str, dataset: str) -> str:
    """An image that is listed in the dataset folder itself (a plain name: no path parts can sneak in)."""
    if (
        not isinstance(image, str)
        or image not in os.listdir(path)
        or not is_image(image)
        or not (path / image).is_file()
        or (path / image).is_symlink()
    ):
        raise FileNotFoundError(f"no image {image!r} in dataset {dataset!r}")
    return image


def save_caption(home: Home, name: str, image: str, text: str) -> dict[str, Any]:
    path = folder(home, name)
    if (path / adapter.METADATA).is_file():
        raise PathRefused(f"this dataset keeps its captions in {adapter.METADATA}; edit that file")
    image = _existing_image(path, image, name)
    if len(text.encode("utf-8")) > MAX_CAPTION_BYTES:
        raise PathRefused(f"caption over {MAX_CAPTION_BYTES} bytes")
    target = (path / image).with_suffix(".txt")
    adapter.atomic_write_text(target, text if text.endswith("\n") or not text else text + "\n")
    return {"saved": target.name}


def remove(home: Home, name: str, image: str) -> dict[str, Any]:
    """Move an image and its caption out of the dataset into HOME/trash/DATASET/TIMESTAMP/ (kept, not deleted)."""
    path = folder(home, name)
    image = _existing_image(path, image, name)
    bin_ = home.area("trash") / name / time.strftime("%Y%m%d-%H%M%S")
    bin_.mkdir(parents=True, exist_ok=True)
    moved = []
    for p in (path / image, (path / image).with_suffix(".txt")):
        if p.is_file() and not (bin_ / p.name).exists():
            os.replace(p, bin_ / p.name)
            moved.append(p.name)
    return {"moved": moved, "to": home.relative(bin_)}
