"""The image–caption rows of a dataset folder in both layouts, with every file-level problem and note.

Text is UTF-8 (a byte-order mark is dropped; UTF-16 and other encodings are refused by name). Hidden entries
(`.DS_Store`, macOS `._cat.png` copies, which carry image extensions but are not images) are skipped, and so
are files of other types — said once in the notes, as are caption files without an image and images in
subfolders, so that nothing the user meant as data is dropped without a word.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dopsd.data.checks import Caption, names
from dopsd.data.image_files import EXTENSIONS

METADATA = "metadata.jsonl"
TEXT_FIELDS = ("caption", "captions", "prompt", "prompts", "description")  # what other tools call "text"


@dataclass
class Row:
    name: str  # the image, relative to the dataset folder
    captions: list[Caption] | None  # None: no usable caption (the problem is recorded)


def read_text(path: Path) -> tuple[str | None, str | None]:
    """(text, None) for UTF-8 with or without a byte-order mark; (None, why) otherwise."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return None, "is UTF-16 (or UTF-32) text; save it as UTF-8"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return None, f"is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save it as UTF-8"
    if "\x00" in text:
        return None, "contains NUL bytes, so it is not a text file; save the caption as UTF-8 text"
    return text, None


def _lines(text: str, where: str) -> list[Caption]:
    return [Caption(line.strip(), f"{where} line {i}") for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _broken_link(p: Path) -> bool:
    return p.is_symlink() and not p.exists()


def _subfolder_images(folders: list[Path]) -> list[str]:
    found = []
    for d in folders:
        try:
            n = sum(1 for q in d.iterdir() if q.suffix.lower() in EXTENSIONS and not q.name.startswith("."))
        except OSError:
            continue
        if n:
            found.append(f"{d.name}/ ({n} images)")
    return found


def caption_file(image: Path, texts: dict[str, Path]) -> Path:
    """The caption file of `image`: its same-name .txt (the name in any case), or where that would be written.
    texts: the folder's .txt files by lower-case stem."""
    txt = image.with_name(f"{image.stem}.txt")
    return txt if txt.is_file() else texts.get(image.stem.lower(), txt)


def folder_images(root: Path) -> tuple[list[Path], dict[str, Path]]:
    """(the images of `root` that training reads, the folder's .txt files by lower-case stem)."""
    entries = [p for p in sorted(root.iterdir()) if not p.name.startswith(".")]
    images = [p for p in entries if p.suffix.lower() in EXTENSIONS and p.is_file()]
    return images, {p.stem.lower(): p for p in entries if p.suffix.lower() == ".txt" and p.is_file()}


def scan_folder(root: Path, problems: list[str], notes: list[str]) -> list[Row]:
    """Images with same-name .txt captions (the .txt suffix in any case)."""
    entries = sorted(root.iterdir())
    hidden = [p.name for p in entries if p.name.startswith(".")]
    entries = [p for p in entries if not p.name.startswith(".")]
    for p in entries:
        if _broken_link(p) and p.suffix.lower() in (*EXTENSIONS, ".txt"):
            problems.append(f"{p.name}: broken symbolic link (to {os.readlink(p)}); fix the link or remove it")
    images, texts = folder_images(root)
    folders = [p for p in entries if p.is_dir()]
    others = [p for p in entries if p.is_file() and p.suffix.lower() not in (*EXTENSIONS, ".txt")]
    by_stem: dict[str, list[str]] = {}
    for p in images:
        by_stem.setdefault(p.stem.lower(), []).append(p.name)
    for group in by_stem.values():
        if len(group) > 1:
            problems.append(f"duplicate name: {', '.join(group)} share one caption file; rename or remove all but one")
    rows: list[Row] = []
    several = []
    for p in images:
        txt = caption_file(p, texts)
        if not txt.is_file():
            problems.append(f"{p.name}: missing caption file {txt.name}")
            rows.append(Row(p.name, None))
            continue
        text, why = read_text(txt)
        if why:
            problems.append(f"{txt.name}: caption {why}")
            rows.append(Row(p.name, None))
            continue
        captions = _lines(text or "", txt.name)
        if not captions:
            problems.append(f"{txt.name}: caption file is empty")
        elif len(captions) > 1:
            several.append(txt.name)
        rows.append(Row(p.name, captions or None))
    unreadable = {p.stem.lower(): p for p in others}
    orphans = []
    for stem, txt in texts.items():
        if stem in by_stem:
            continue
        if stem in unreadable:
            problems.append(
                f"{unreadable[stem].name}: has the caption {txt.name}, but {unreadable[stem].suffix} files are not "
                f"images dopsd reads ({' '.join(EXTENSIONS)}); convert it to PNG or JPEG"
            )
            others.remove(unreadable[stem])
        else:
            orphans.append(txt.name)
    if several:
        notes.append(
            f"{len(several)} caption file(s) have several lines ({names(several)}): each line is a separate "
            "caption, one picked at random per sample; join the lines if they are one caption"
        )
    if orphans:
        notes.append(f"{len(orphans)} caption file(s) have no image beside them and are unused: {names(orphans)}")
    _note_skipped(hidden, [p.name for p in others], folders, bool(rows), root, problems, notes)
    return rows


def _note_skipped(
    hidden: list[str],
    others: list[str],
    folders: list[Path],
    any_rows: bool,
    root: Path,
    problems: list[str],
    notes: list[str],
) -> None:
    if hidden:
        notes.append(
            f"skipped {len(hidden)} hidden file(s) ({names(hidden)}): dotfiles and macOS '._' copies are "
            "not training data"
        )
    if others:
        notes.append(
            f"skipped {len(others)} file(s) that are neither images dopsd reads ({' '.join(EXTENSIONS)}) "
            f"nor captions: {names(others)}"
        )
    nested = _subfolder_images(folders)
    if nested and not any_rows:
        problems.append(
            f"no images in {root} itself, but its subfolders hold some ({names(nested)}): dopsd reads "
            "one folder, not its subfolders; point data.path at one of them, or list them all in a "
            f"{METADATA} with file_name paths like 'sub/img.png'"
        )
    elif nested:
        notes.append(
            f"images in subfolders are not used ({names(nested)}): dopsd reads data.path itself, not its "
            f"subfolders (a {METADATA} can list them)"
        )


def _metadata_captions(row: dict, where: str, name: str, problems: list[str]) -> list[Caption] | None:
    text = row.get("text")
    if text is None:
        alias = next((k for k in TEXT_FIELDS if k in row), None)
        rename = f' (found "{alias}": rename it to "text", the imagefolder name)' if alias else ""
        problems.append(f'{where} ({name}): no "text" field{rename}')
        return None
    items = [text] if isinstance(text, str) else text
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        problems.append(f'{where} ({name}): "text" must be a string or a list of strings')
        return None
    captions = []
    for k, t in enumerate(items, 1):
        label = f"{where} caption {k} ({name})" if len(items) > 1 else f"{where} ({name})"
        captions += [Caption(c.text, label) for c in _lines(t, "")]
    if not captions:
        problems.append(f"{where} ({name}): empty caption")
    return captions or None


def scan_metadata(root: Path, problems: list[str], notes: list[str]) -> list[Row]:
    """A Hugging Face imagefolder metadata.jsonl: one {"file_name", "text"} object per line."""
    text, why = read_text(root / METADATA)
    if why:
        problems.append(f"{METADATA} {why}")
        return []
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate((text or "").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{METADATA} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: not valid JSON ({err.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            problems.append(f'{where}: needs a string "file_name"')
            continue
        name = row["file_name"]
        if name in seen:
            problems.append(f"duplicate name: {name} appears on lines {seen[name]} and {lineno}")
            continue
        seen[name] = lineno
        captions = _metadata_captions(row, where, name, problems)
        path = root / name
        if _broken_link(path):
            problems.append(f"{name}: broken symbolic link (to {os.readlink(path)}); fix the link or remove it")
            continue
        if not path.is_file():
            slash = " (use / in file_name paths)" if "\\" in name else ""
            problems.append(f"{name}: listed in {METADATA} but the file does not exist{slash}")
            continue
        rows.append(Row(name, captions))
    listed = {os.path.normpath(n) for n in seen}
    unlisted = [
        p.name
        for p in sorted(root.iterdir())
        if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and p.name not in listed
    ]
    if unlisted:
        notes.append(
            f"{len(unlisted)} image(s) in the folder are not listed in {METADATA} and are unused: {names(unlisted)}"
        )
    return rows


def find_sources(source_dir: Path, name: str) -> list[Path]:
    stem = Path(name).stem
    single = [p for p in source_dir.glob(f"{stem}.*") if p.suffix.lower() in EXTENSIONS]
    if single:
        return sorted(single)[:1]
    numbered: list[Path] = []
    while True:
        hits = [p for p in source_dir.glob(f"{stem}_{len(numbered)}.*") if p.suffix.lower() in EXTENSIONS]
        if not hits:
            return numbered
        numbered.append(sorted(hits)[0])
