"""`dopsd probe`: before training, check that the teacher context actually carries each training pair.

D-OPSD can only teach what its teacher shows: the teacher is the model itself, conditioned on caption + target
image. For each pair and a few seeds we sample at the model's own few-step setting from the same noise twice,
with the student context (caption only) and with the teacher context (caption + target), and measure how much
closer the teacher's samples are to the target:

    gain          = d(student sample, target) − d(teacher sample, target)       (mean over seeds)
    relative gain = gain / d(student sample, target)   – the fraction of the distance the context closes
    win rate      = fraction of seeds where the teacher's sample is the closer one

Verdicts (thresholds configurable, defaults in `Thresholds`):
    carries – relative gain ≥ 0.25 and win rate ≥ 0.5: the teacher renders what the image shows;
    fails   – relative gain < 0.10: the context adds (almost) nothing; D-OPSD would learn nothing or noise;
    weak    – in between.
The distance comes from a `Scorer` (see `dopsd.tools.probe.scorers`): the model family's own (the miniature's attribute decoders), an
image-feature model from a local folder (cosine distance), or a downsampled pixel distance as the fallback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from dopsd.config import load_config
from dopsd.core.sampler import generate, seed_noise
from dopsd.data.dataset import check_dataset, load_example_images
from dopsd.data.images import labelled_grid, to_pil
from dopsd.files import atomic_save_image
from dopsd.models.base import ModelAdapter
from dopsd.models.registry import check_teacher_folder, load_adapter
from dopsd.tools.probe.scorers import PixelScorer, Scorer

Pair = tuple[Image.Image, str]


@dataclass
class Thresholds:
    carry: float = 0.25  # relative gain at or above which the teacher carries the pair (with win_rate ≥ min_win)
    weak: float = 0.10  # relative gain below which the pair fails
    min_win: float = 0.5  # a carrying pair must have the teacher closer in at least this fraction of seeds
    max_fail: float = 0.25  # --strict: exit non-zero when more than this fraction of pairs fail

    def __post_init__(self) -> None:
        if not 0.0 <= self.weak <= self.carry:
            raise ValueError(f"probe thresholds need 0 <= weak <= carry, got weak={self.weak}, carry={self.carry}")
        if not 0.0 <= self.max_fail <= 1.0:
            raise ValueError(f"probe max_fail is a fraction in [0, 1], got {self.max_fail}")


@dataclass
class PairResult:
    index: int
    caption: str
    name: str
    student_distance: float
    teacher_distance: float
    gain: float
    relative_gain: float
    win_rate: float
    verdict: str
    student_hit: float | None = None  # fraction of samples showing the concept (scorers with a `hits` decoder)
    teacher_hit: float | None = None


@dataclass
class ProbeReport:
    metric: str
    steps: int
    seeds: list[int]
    thresholds: Thresholds
    pairs: list[PairResult]
    images: list[tuple[Image.Image, Image.Image, Image.Image]] = field(default_factory=list, repr=False)
    family: str | None = None  # adapter.name
    teacher_context: str | None = None
    teacher_context_kinds: tuple[str, ...] = ("vlm", "reference")  # what the model offers, for recommendations

    def counts(self) -> dict[str, int]:
        return {v: sum(p.verdict == v for p in self.pairs) for v in ("carries", "weak", "fails")}

    @property
    def fail_fraction(self) -> float:
        return self.counts()["fails"] / max(len(self.pairs), 1)

    @property
    def passed(self) -> bool:
        """False when more than `thresholds.max_fail` of the pairs fail (what --strict gates on)."""
        return self.fail_fraction <= self.thresholds.max_fail

    def recommendations(self) -> list[str]:
        return _recommendations(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "family": self.family,
            "teacher_context": self.teacher_context,
            "steps": self.steps,
            "seeds": self.seeds,
            "thresholds": asdict(self.thresholds),
            "counts": self.counts(),
            "fail_fraction": self.fail_fraction,
            "passed": self.passed,
            "pairs": [asdict(p) for p in self.pairs],
            "recommendations": self.recommendations(),
        }

    def table(self) -> str:
        hit = any(p.teacher_hit is not None for p in self.pairs)
        head = f"{'#':>3}  {'name':<20} {'d_student':>9} {'d_teacher':>9} {'rel.gain':>8} {'wins':>5}"
        head += f" {'hit s→t':>9}" if hit else ""
        lines = [head + "  verdict", "-" * (len(head) + 9)]
        for p in self.pairs:
            row = f"{p.index:>3}  {p.name[:20]:<20} {p.student_distance:>9.4f} {p.teacher_distance:>9.4f}"
            row += f" {p.relative_gain:>8.2f} {p.win_rate:>5.2f}"
            if hit:
                row += f" {p.student_hit or 0:>4.2f}→{p.teacher_hit or 0:.2f}"
            lines.append(f"{row}  {p.verdict}")
        return "\n".join(lines)

    def save_grid(self, path: str | Path, cell: int = 96) -> Path:
        return save_grid(self.images, [f"#{p.index} {p.verdict}" for p in self.pairs], path, cell)


def _verdict(rel_gain: float, win_rate: float, t: Thresholds) -> str:
    if rel_gain >= t.carry and win_rate >= t.min_win:
        return "carries"
    if rel_gain < t.weak:
        return "fails"
    return "weak"


def probe(
    config_or_adapter: ModelAdapter | Any,
    pairs: Sequence[Pair] | None = None,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    size: tuple[int, int] | None = None,
    scorer: Scorer | None = None,
    thresholds: Thresholds | None = None,
    names: Sequence[str] | None = None,
    sources: Sequence[list[Image.Image]] | None = None,
    batch_size: int = 16,
    release_encoders: bool | None = None,
) -> ProbeReport:
    """Sample each pair with student and teacher context at the few-step setting; score the teacher's gain.

    `pairs` are (target image, caption); `size` = (height, width) to sample at (default: each target's own
    size); `sources` are editing source images per pair (editing adapters only).
    `config_or_adapter` is a loaded adapter, or a training config (Config, YAML path or preset name): the
    adapter is then loaded from it, and `pairs=None` probes its dataset (the same one `dopsd train` reads).
    `release_encoders`: free the encoders once every context is built (default: when the probe loaded the
    adapter itself; a caller's adapter keeps them unless asked).
    """
    if isinstance(config_or_adapter, ModelAdapter):
        adapter = config_or_adapter
        release_encoders = bool(release_encoders)
    else:
        setup = load_setup(config_or_adapter, with_data=pairs is None)
        adapter = setup.adapter
        release_encoders = release_encoders is None or release_encoders
        if pairs is None:
            pairs, names, sources = setup.pairs, setup.names, setup.sources
    if not pairs:
        raise ValueError("probe: no training pairs given (is the dataset empty?)")
    if not seeds:
        raise ValueError("probe: give at least one seed")
    scorer = scorer or PixelScorer()
    thresholds = thresholds or Thresholds()
    names = list(names) if names is not None else [f"pair{i}" for i in range(len(pairs))]
    seeds = [int(s) for s in seeds]
    # Flatten to (pair, seed) jobs; the same noise per seed for student and teacher: a paired comparison.
    jobs = [(i, s) for i in range(len(pairs)) for s in seeds]
    dist = {"student": torch.zeros(len(pairs), len(seeds)), "teacher": torch.zeros(len(pairs), len(seeds))}
    hits: dict[str, torch.Tensor] = {}
    first: dict[tuple[str, int], Image.Image] = {}
    n_steps = 0
    with torch.no_grad():  # generate samples as at inference (dropout off); this covers the encoders' calls
        groups = []  # every context first: the encoders can then go before the denoiser loads (full size: ~20 GB)
        for start in range(0, len(jobs), batch_size):
            by_size: dict[tuple[int, int], list[tuple[int, int]]] = {}
            for i, s in jobs[start : start + batch_size]:
                by_size.setdefault(size or (pairs[i][0].height, pairs[i][0].width), []).append((i, s))
            for (h, w), group in by_size.items():
                caps = [pairs[i][1] for i, _ in group]
                imgs = [pairs[i][0].convert("RGB") for i, _ in group]
                src = [list(sources[i]) for i, _ in group] if sources is not None else None
                targets = [img.resize((w, h), Image.BICUBIC) if img.size != (w, h) else img for img in imgs]
                contexts = {
                    "student": adapter.student_contexts(caps, src),
                    "teacher": adapter.teacher_contexts(caps, imgs, src),
                }
                groups.append((h, w, group, targets, contexts))
        if release_encoders:
            adapter.release_encoders()
        for h, w, group, targets, contexts in groups:
            schedule = adapter.inference_schedule(h, w, steps)
            n_steps = len(schedule) - 1
            noise = seed_noise(tuple(adapter.latent_shape(h, w)), [s for _, s in group])
            out = {
                role: generate(adapter, adapter.network, ctx, noise, schedule, batch_size=len(group))
                for role, ctx in contexts.items()
            }
            for role, samples in out.items():
                d = scorer.distance(samples, targets)
                hit = scorer.hits(samples, targets) if hasattr(scorer, "hits") else None
                for k, (i, s) in enumerate(group):
                    j = seeds.index(s)
                    dist[role][i, j] = float(d[k])
                    if hit is not None:
                        hits.setdefault(role, torch.zeros(len(pairs), len(seeds)))[i, j] = float(hit[k])
                    if j == 0:
                        first[(role, i)] = to_pil(samples[k : k + 1])[0]

    results = []
    for i, (_img, caption) in enumerate(pairs):
        d_s, d_t = float(dist["student"][i].mean()), float(dist["teacher"][i].mean())
        gain = d_s - d_t
        rel = gain / d_s if d_s > 1e-12 else 0.0
        win = float((dist["teacher"][i] < dist["student"][i]).float().mean())
        res = PairResult(i, caption, names[i], d_s, d_t, gain, rel, win, _verdict(rel, win, thresholds))
        if hits:
            res.student_hit = float(hits["student"][i].mean())
            res.teacher_hit = float(hits["teacher"][i].mean())
        results.append(res)
    images = [(pairs[i][0].convert("RGB"), first[("student", i)], first[("teacher", i)]) for i in range(len(pairs))]
    metric = getattr(scorer, "name", type(scorer).__name__)
    return ProbeReport(
        metric,
        n_steps,
        seeds,
        thresholds,
        results,
        images,
        adapter.name,
        adapter.teacher_context,
        tuple(adapter.teacher_context_kinds),
    )


def save_grid(rows: list[tuple[Image.Image, ...]], labels: list[str], path: str | Path, cell: int = 96) -> Path:
    """A PNG with one row per pair: target | student sample | teacher sample (seed 0), with a header."""
    ncol = max((len(r) for r in rows), default=3)
    columns = ["target", "student (caption)", "teacher (+image)"][:ncol]
    path = Path(path)
    atomic_save_image(path, labelled_grid(rows, columns, labels, cell))
    return path


def _recommendations(report: ProbeReport) -> list[str]:
    bad = [p for p in report.pairs if p.verdict != "carries"]
    if not bad:
        return ["every pair carries: the teacher renders what the images show; D-OPSD can learn them."]
    ids = lambda ps: ", ".join(f"#{p.index} {p.name}" for p in ps)  # noqa: E731
    current = report.teacher_context
    others = [c for c in report.teacher_context_kinds if c != current]
    if others:
        ctx = f"try model.teacher_context={others[0]} instead of {current or 'the current one'}"
        ctx += " (the target as reference-image tokens: keeps identity better)" if others[0] == "reference" else ""
    else:
        ctx = f"this model has no other teacher context than {current}; a stronger VLM (model.teacher_encoder) may help"
    out = []
    weak = [p for p in bad if p.verdict == "weak"]
    fails = [p for p in bad if p.verdict == "fails"]
    if weak:
        out.append(
            f"weak ({ids(weak)}): the teacher moves only part of the way toward the target. {ctx}; or make the "
            "caption name what the image shows that the context does not carry (object type, layout, style)."
        )
    if fails:
        out.append(
            f"fails ({ids(fails)}): with the target in context the model still does not render it, so D-OPSD "
            f"would teach the wrong thing for these. {ctx}; rewrite the caption; or drop the pair."
        )
    if len(fails) == len(report.pairs):
        out.append(
            "no pair carries: this model's in-context path cannot show these concepts; D-OPSD will not learn them."
        )
    return out


PROBE_FILES = r"probe\.json|probe_grid\.png"  # what `dopsd probe` writes into its folder

# --- config, dataset and CLI ---------------------------------------------------------------------------


@dataclass
class Setup:
    adapter: Any
    pairs: list[Pair]
    names: list[str]
    sources: list[list[Image.Image]] | None
    config: Any


def load_setup(
    source: Any, overrides: list[str] | None = None, with_data: bool = True, limit: int | None = None
) -> Setup:
    """The adapter and (first-caption) training pairs exactly as `dopsd train` would read them."""
    cfg = load_config(source, overrides)
    check_teacher_folder(cfg.model)  # the probe samples the teacher: its folder is checked before weights load
    examples = []
    if with_data:  # validate before loading weights, and say once what loading does to the data
        dataset = check_dataset(cfg.data, cfg.model)
        print(dataset.summary(), flush=True)
        examples = dataset.examples[:limit]
    device = cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = load_adapter(cfg.model, device)
    pairs, sources = [], []
    for ex in examples:
        image, srcs = load_example_images(ex)
        pairs.append((image, ex.captions[0]))
        sources.append(srcs)
    names = [ex.name for ex in examples]
    return Setup(adapter, pairs, names, sources if any(sources) else None, cfg)


__all__ = ["Thresholds", "PairResult", "ProbeReport", "Setup", "probe", "load_setup", "save_grid"]
