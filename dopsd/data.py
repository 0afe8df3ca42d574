"""Image–caption datasets in the layouts users already have, validated in full before anything starts.

Layouts:
  * a folder of images with same-name `.txt` captions (`cat.png` + `cat.txt`);
  * a Hugging Face imagefolder `metadata.jsonl`, one `{"file_name": ..., "text": ...}` per line.
A caption file with several non-empty lines, or a `text` that is a list, gives several captions; one is
picked at random per sample. Editing datasets add source images in `data.source_dir` named like the target
(`NAME.ext`, or `NAME_0.ext`, `NAME_1.ext`, … for several sources, in that order).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from dopsd.config import DataConfig, ModelConfig
from dopsd.errors import DopsdError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


class DatasetError(DopsdError, ValueError):
    """Every problem found in a dataset, in one message; nothing was started."""

    def __init__(self, root: str | Path, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"dataset {root}: {len(problems)} problem(s); nothing was started. Fix these and run again:\n{lines}"
        )


@dataclass
class Example:
    name: str  # file name relative to the dataset folder
    image: Path
    captions: list[str]
    sources: list[Path] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # original (width, height)
    bucket: tuple[int, int] = (0, 0)  # training (height, width)
    digest: str = ""  # content hash of the image (and sources): the cache key part for this example


def apply_trigger(caption: str, cfg: DataConfig) -> str:
    """Replace the placeholder by the trigger word, or prepend the trigger word if the caption lacks it."""
    caption = caption.strip()
    if not cfg.trigger_word:
        return caption
    if cfg.placeholder and cfg.placeholder in caption:
        return caption.replace(cfg.placeholder, cfg.trigger_word)
    if cfg.trigger_word in caption.split():
        return caption
    return f"{cfg.trigger_word} {caption}".strip()


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
    """RGB image scaled to cover (h, w) and centre-cropped to it."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")
        h, w = size
        return ImageOps.fit(img, (w, h), method=Image.Resampling.LANCZOS)


def _read_image_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()  # structure check
            with Image.open(path) as img:
                img.load()  # full decode: catches truncated files that verify() lets through
                return img.size, None
    except Exception as err:  # noqa: BLE001 - every decoder error is a bad file
        return None, f"cannot read image ({type(err).__name__}: {err})"


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _split_captions(text: object) -> list[str] | None:
    if isinstance(text, str):
        return [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        return [t.strip() for t in text if t.strip()]
    return None


def _scan_folder(root: Path, problems: list[str]) -> list[tuple[str, list[str] | None]]:
    images = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    by_stem: dict[str, list[str]] = {}
    for p in images:
        by_stem.setdefault(p.stem.lower(), []).append(p.name)
    for names in by_stem.values():
        if len(names) > 1:
            problems.append(f"duplicate name: {', '.join(names)} share one caption file; rename or remove all but one")
    rows: list[tuple[str, list[str] | None]] = []
    for p in images:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            problems.append(f"{p.name}: missing caption file {txt.name}")
            rows.append((p.name, None))
            continue
        try:
            captions = _split_captions(txt.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            problems.append(f"{txt.name}: caption is not UTF-8 text")
            rows.append((p.name, None))
            continue
        if not captions:
            problems.append(f"{txt.name}: caption file is empty")
        rows.append((p.name, captions or None))
    return rows


def _scan_metadata(root: Path, problems: list[str]) -> list[tuple[str, list[str] | None]]:
    rows: list[tuple[str, list[str] | None]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate((root / METADATA).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{METADATA} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: not valid JSON ({err.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            problems.append(f"{where}: needs a string \"file_name\"")
            continue
        name = row["file_name"]
        if name in seen:
            problems.append(f"duplicate name: {name} appears on lines {seen[name]} and {lineno}")
            continue
        seen[name] = lineno
        captions = _split_captions(row.get("text"))
        if captions is None:
            problems.append(f"{where} ({name}): \"text\" must be a string or a list of strings")
        elif not captions:
            problems.append(f"{where} ({name}): empty caption")
        if not (root / name).is_file():
            problems.append(f"{name}: listed in {METADATA} but the file does not exist")
            continue
        rows.append((name, captions or None))
    return rows


def _find_sources(source_dir: Path, name: str) -> list[Path]:
    stem = Path(name).stem
    single = [p for p in source_dir.glob(f"{stem}.*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    if single:
        return sorted(single)[:1]
    numbered: list[Path] = []
    while True:
        hits = [p for p in source_dir.glob(f"{stem}_{len(numbered)}.*") if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not hits:
            return numbered
        numbered.append(sorted(hits)[0])


def load_dataset(data: DataConfig, model: ModelConfig) -> list[Example]:
    """Scan and validate the whole dataset; raise one DatasetError listing every bad file."""
    if not data.path:
        raise DatasetError("(data.path not set)", ["set data.path to a folder of images with .txt captions"])
    root = Path(data.path).expanduser()
    if not root.is_dir():
        raise DatasetError(root, [f"{root} is not a folder"])
    problems: list[str] = []
    rows = _scan_metadata(root, problems) if (root / METADATA).is_file() else _scan_folder(root, problems)
    if not rows and not problems:
        problems.append(f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files or {METADATA})")
    min_size = data.min_size if data.min_size is not None else max(1, min(model.height, model.width) // 2)
    source_dir = Path(data.source_dir).expanduser() if data.source_dir else None
    if source_dir is not None and not source_dir.is_dir():
        problems.append(f"data.source_dir {source_dir} is not a folder")
        source_dir = None
    buckets = bucket_sizes(model.height, model.width, data.bucket_multiple) if data.buckets else None
    examples: list[Example] = []
    for name, captions in rows:
        path = root / name
        size, error = _read_image_size(path)
        if error:
            problems.append(f"{name}: {error}")
            continue
        assert size is not None
        if min(size) < min_size:
            problems.append(f"{name}: {size[0]}×{size[1]} is smaller than the minimum side {min_size} (data.min_size)")
            continue
        sources: list[Path] = []
        if model.editing and source_dir is not None:
            sources = _find_sources(source_dir, name)
            if not sources:
                problems.append(f"{name}: no source image {Path(name).stem}.* or {Path(name).stem}_0.* in {source_dir}")
            for src in sources:
                _, src_error = _read_image_size(src)
                if src_error:
                    problems.append(f"{src.name} (source of {name}): {src_error}")
        if captions is None:
            continue
        bucket = choose_bucket(size, buckets) if buckets else (model.height, model.width)
        caps = [apply_trigger(c, data) for c in captions]
        examples.append(Example(name, path, caps, sources, size, bucket, _digest([path, *sources])))
    if problems:
        raise DatasetError(root, problems)
    return examples


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
            key = self.keys[int(np.random.default_rng([self.seed, step, 7]).choice(len(self.keys), p=sizes / sizes.sum()))]
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
            raise ValueError(f"checkpoint data order has buckets {sorted(state)}, this dataset {self.keys}: data changed")
        self.state = {k: list(v) for k, v in state.items()}
