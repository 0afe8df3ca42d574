"""Image–caption datasets in the layouts users already have, validated in full before anything starts.

Layouts:
  * a folder of images with same-name `.txt` captions (`cat.png` + `cat.txt`);
  * a Hugging Face imagefolder `metadata.jsonl`, one `{"file_name": ..., "text": ...}` per line.
A caption file with several non-empty lines, or a `text` that is a list, gives several captions; one is
picked at random per sample. Editing datasets add source images in `data.source_dir` named like the target
(`NAME.ext`, or `NAME_0.ext`, `NAME_1.ext`, … for several sources, in that order).

`check_dataset` reads every image exactly as training will (dopsd.data.image_files) and every caption through the
model family's caption check, raises one DatasetError listing every problem, and otherwise returns a
DatasetReport: the examples plus notes on what training will do to them (downscaling, cropping, transparency,
cut captions, ignored files …) that `dopsd train` and `dopsd probe` print once. `load_dataset` is the same
check returning only the examples. Text files are UTF-8 (a byte-order mark is allowed); hidden files (`.*`,
macOS `._*` copies) are skipped.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dopsd.config import DataConfig, ModelConfig
from dopsd.data.checks import check_captions, contains_phrase, format_counts, image_notes, names, normalized_trigger
from dopsd.data.image_files import EXTENSIONS, ImageFacts, ImageRefused, inspect_image
from dopsd.data.image_files import load_image as _load_image
from dopsd.data.scan import METADATA, find_sources, scan_folder, scan_metadata
from dopsd.errors import DopsdError
from dopsd.models.local import ModelFolderError

IMAGE_EXTENSIONS = EXTENSIONS


class DatasetError(DopsdError, ValueError):
    """Every problem found in a dataset, in one message; nothing was started."""

    def __init__(self, root: str | Path, problems: list[str], hints: list[str] | None = None):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        extra = "".join(f"\n  {h}" for h in hints or [])
        super().__init__(
            f"dataset {root}: {len(problems)} problem(s); nothing was started. Fix these and run again:\n{lines}{extra}"
        )


@dataclass
class Example:
    name: str  # file name relative to the dataset folder
    image: Path
    captions: list[str]
    sources: list[Path] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # original (width, height), upright (after the EXIF orientation)
    bucket: tuple[int, int] = (0, 0)  # training (height, width)
    digest: str = ""  # content hash of the image (and sources): the cache key part for this example


@dataclass
class DatasetReport:
    """The checked dataset: its examples, and what training will do to them (one line per kind of change)."""

    root: Path
    examples: list[Example]
    notes: list[str] = field(default_factory=list)
    formats: str = ""  # "12 JPEG, 3 PNG"

    def summary(self) -> str:
        """The text `dopsd train` / `dopsd probe` print once before they start."""
        n_captions = sum(len(e.captions) for e in self.examples)
        head = f"dataset {self.root}: {len(self.examples)} images ({self.formats}), {n_captions} captions"
        if not self.notes:
            return f"{head}; used as they are"
        bullets = "\n".join("  - " + note.replace("\n", "\n      ") for note in self.notes)
        return f"{head}. What training will do with them:\n{bullets}"


def apply_trigger(caption: str, cfg: DataConfig) -> str:
    """Replace the placeholder by the trigger word, or prepend the trigger word if the caption lacks it
    (as whole words, so 'ohwx, a dog' and multi-word triggers count as having it)."""
    caption = caption.strip()
    trigger = normalized_trigger(cfg.trigger_word)
    if not trigger:
        return caption
    if cfg.placeholder and cfg.placeholder in caption:
        return caption.replace(cfg.placeholder, trigger)
    if contains_phrase(caption, trigger):
        return caption
    return f"{trigger} {caption}".strip()


def bucket_sizes(height: int, width: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(h, w) buckets of about the area height·width, sides multiples of `multiple`, aspect within max_ratio."""
    area = height * width
    sizes = {(height, width)}
    w = multiple
    while w <= math.sqrt(area * max_ratio) + multiple:
        h = max(multiple, round(area / w / multiple) * multiple)
        if 1 / max_ratio <= w / h <= max_ratio:
            sizes.add((h, w))
        w += multiple
    return sorted(sizes)


def choose_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to the image's (width, height)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - ratio), -hw[0] * hw[1]))


def load_image(path: Path, size: tuple[int, int]) -> Image.Image:
    """The training image: upright 8-bit sRGB (dopsd.data.image_files), scaled to cover (h, w), centre-cropped."""
    try:
        return _load_image(path, size)
    except ImageRefused as err:  # it passed the check, so it changed since: say so rather than crash
        raise DatasetError(
            Path(path).parent, [f"{Path(path).name}: {err} (the file changed after the check)"]
        ) from None


def _check_root(data: DataConfig) -> Path:
    if not data.path:
        raise DatasetError("(data.path not set)", ["set data.path to a folder of images with .txt captions"])
    root = Path(data.path).expanduser()
    if root.is_dir():
        return root
    if root.name == METADATA and root.is_file():
        why = f"data.path is the {METADATA} file itself: set it to the folder that holds it ({root.parent})"
    elif root.is_file() and root.suffix.lower() in IMAGE_EXTENSIONS:
        why = f"data.path is one image: put it in a folder with its caption ({root.stem}.txt) and point data.path there"
    elif root.is_file():
        why = f"data.path {root} is a file: set it to the folder of images and captions"
    elif _is_broken_link(root):
        why = f"data.path {root} is a broken symbolic link (to {os.readlink(root)})"
    else:
        why = f"{root} is not a folder (it does not exist)"
    raise DatasetError(root, [why])


def _is_broken_link(p: Path) -> bool:
    return p.is_symlink() and not p.exists()


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _inspect(path: Path, label: str, problems: list[str]) -> ImageFacts | None:
    try:
        return inspect_image(path)
    except ImageRefused as err:
        problems.append(f"{label}: {err}")
        return None


def _min_size(data: DataConfig, model: ModelConfig) -> int:
    return data.min_size if data.min_size is not None else max(1, min(model.height, model.width) // 2)


def check_image(path: Path, data: DataConfig, model: ModelConfig) -> list[str]:
    """The dataset check's problems with one image file alone (readable, supported, large enough): what an
    upload can be checked for before its caption exists."""
    problems: list[str] = []
    facts = _inspect(path, path.name, problems)
    if facts is not None and min(facts.size) < _min_size(data, model):
        problems.append(
            f"{path.name}: {facts.size[0]}×{facts.size[1]} is smaller than the minimum side "
            f"{_min_size(data, model)} (data.min_size)"
        )
    return problems


def check_dataset(data: DataConfig, model: ModelConfig, batch_size: int = 1) -> DatasetReport:
    """Scan and validate the whole dataset: one DatasetError listing every problem, or the report. `batch_size`
    (samples per micro-batch) matters for editing pairs: one batch shares its reference-image positions."""
    root = _check_root(data)
    problems: list[str] = []
    scan_notes: list[str] = []  # said last: skipped files matter less than what happens to the used ones
    caption_notes: list[str] = []
    scan = scan_metadata if (root / METADATA).is_file() else scan_folder
    rows = scan(root, problems, scan_notes)
    if not rows and not problems:
        problems.append(f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files or {METADATA})")
    min_size = _min_size(data, model)
    source_dir = Path(data.source_dir).expanduser() if data.source_dir else None
    if source_dir is not None and not source_dir.is_dir():
        problems.append(f"data.source_dir {source_dir} is not a folder")
        source_dir = None
    buckets = bucket_sizes(model.height, model.width, data.bucket_multiple) if data.buckets else None
    examples: list[Example] = []
    seen: list[tuple[str, ImageFacts, tuple[int, int]]] = []
    for row in rows:
        path = root / row.name
        facts = _inspect(path, row.name, problems)
        if facts is None:
            continue
        if min(facts.size) < min_size:
            problems.append(
                f"{row.name}: {facts.size[0]}×{facts.size[1]} is smaller than the minimum side {min_size} "
                "(data.min_size)"
            )
            continue
        sources: list[Path] = []
        if model.editing and source_dir is not None:
            sources = find_sources(source_dir, row.name)
            if not sources:
                problems.append(
                    f"{row.name}: no source image {Path(row.name).stem}.* or {Path(row.name).stem}_0.* in {source_dir}"
                )
            for src in sources:
                _inspect(src, f"{src.name} (source of {row.name})", problems)
        if row.captions is None:
            continue
        bucket = choose_bucket(facts.size, buckets) if buckets else (model.height, model.width)
        caps = [apply_trigger(c.text, data) for c in row.captions]
        examples.append(Example(row.name, path, caps, sources, facts.size, bucket, _digest([path, *sources])))
        seen.append((row.name, facts, bucket))
    if model.editing and batch_size > 1:
        problems += _mixed_source_counts(examples, batch_size)
    captions = [c for row in rows if row.captions for c in row.captions]
    applied = [apply_trigger(c.text, data) for c in captions]
    try:
        hints = check_captions(captions, applied, data, model, problems, caption_notes)
    except ModelFolderError as err:  # the tokenizer's folder is bad too: list it with the files' problems
        if not problems:
            raise
        problems.append(f"captions not checked yet: {err}")
        hints = []
    if problems:
        raise DatasetError(root, problems, hints)
    notes = image_notes(seen, model.height, model.width)
    twins: dict[str, list[str]] = {}
    for ex in examples:
        twins.setdefault(ex.digest, []).append(ex.name)
    same = [" = ".join(group) for group in twins.values() if len(group) > 1]
    if same:
        notes.append(
            f"{len(same)} image(s) appear more than once (identical files), so they weigh double: {names(same)}"
        )
    return DatasetReport(root, examples, notes + caption_notes + scan_notes, format_counts([f for _, f, _ in seen]))


def _mixed_source_counts(examples: list[Example], batch_size: int) -> list[str]:
    """Pairs of one size bucket (they may share a micro-batch) with different numbers of source images."""
    by_bucket: dict[tuple[int, int], dict[int, list[str]]] = {}
    for ex in examples:
        by_bucket.setdefault(ex.bucket, {}).setdefault(len(ex.sources), []).append(ex.name)
    out = []
    for bucket, counts in by_bucket.items():
        if len(counts) > 1:
            groups = "; ".join(f"{n} source(s): {names(group)}" for n, group in sorted(counts.items()))
            out.append(
                f"pairs that can share a batch (size {bucket[1]}×{bucket[0]}) have different numbers of source "
                f"images ({groups}): with train.batch_size={batch_size} every pair of a batch needs the same "
                "number; give every pair the same number of sources, or set train.batch_size=1"
            )
    return out


def load_dataset(data: DataConfig, model: ModelConfig) -> list[Example]:
    """The examples of `check_dataset` (same checks, same DatasetError), without its notes."""
    return check_dataset(data, model).examples


def load_example_images(example: Example) -> tuple[Image.Image, list[Image.Image]]:
    """The target and source images at the example's training size."""
    return load_image(example.image, example.bucket), [load_image(s, example.bucket) for s in example.sources]


def distinct_captions(examples: list[Example], n: int) -> list[str]:
    out: list[str] = []
    for ex in examples:
        if ex.captions[0] not in out:
            out.append(ex.captions[0])
        if len(out) == n:
            break
    return out


class BatchOrder:
    """Which examples each global batch holds: seeded per-bucket permutations, consumed in order.

    Every process computes the same global batches (and takes its own slice), so the order does not
    depend on the number of processes; its state (epoch and position per bucket) is saved in checkpoints.
    """

    def __init__(self, examples: list[Example], seed: int):
        self.seed = seed
        self.groups: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            self.groups.setdefault(f"{ex.bucket[0]}x{ex.bucket[1]}", []).append(i)
        self.keys = sorted(self.groups)
        self.state: dict[str, list[int]] = {k: [0, 0] for k in self.keys}  # bucket -> [epoch, position]

    def _perm(self, key: str, epoch: int) -> list[int]:
        import numpy as np

        members = self.groups[key]
        order = np.random.default_rng([self.seed, self.keys.index(key), epoch]).permutation(len(members))
        return [members[j] for j in order]

    def next(self, step: int, size: int) -> list[int]:
        """The next `size` example indices, all from one bucket (chosen ∝ bucket size, seeded by step)."""
        import numpy as np

        key = self.keys[0]
        if len(self.keys) > 1:
            sizes = np.array([len(self.groups[k]) for k in self.keys], dtype=float)
            key = self.keys[
                int(np.random.default_rng([self.seed, step, 7]).choice(len(self.keys), p=sizes / sizes.sum()))
            ]
        epoch, pos = self.state[key]
        out: list[int] = []
        perm = self._perm(key, epoch)
        while len(out) < size:
            if pos == len(perm):
                epoch, pos = epoch + 1, 0
                perm = self._perm(key, epoch)
            take = min(size - len(out), len(perm) - pos)
            out += perm[pos : pos + take]
            pos += take
        self.state[key] = [epoch, pos]
        return out

    def state_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        if set(state) != set(self.keys):
            raise ValueError(
                f"checkpoint data order has buckets {sorted(state)}, this dataset {self.keys}: data changed"
            )
        self.state = {k: list(v) for k, v in state.items()}
