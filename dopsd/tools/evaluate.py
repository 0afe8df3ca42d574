"""`dopsd eval`: what the paper reports, for a trained LoRA, at the model's few-step setting.

For the training prompts (first caption of each training pair, with its target image) and for unseen
prompts, sample with fixed seeds at the few-step setting and at a many-step control, with the LoRA and
(by default) without it, then report (each (prompt, seed) has its own noise, drawn as `dopsd sample` draws it,
`dopsd.core.sampler.sample_seed`, so a grid cell can be reproduced alone; with and without the LoRA share it):
  * DINO-D (lower = closer to the targets): 1 − cos between image features of a sample and its own target
    (training prompts), and to the nearest target (any prompt), from a local DINOv2/DINOv3/CLIP/SigLIP
    folder; without one, a pixel-thumbnail fallback (`dopsd.tools.features.PixelFeatures`, not comparable to the
    paper's numbers);
  * CLIP-S: caption–image cosine from a local CLIP/SigLIP folder (skipped without one);
  * few-step vs many-step gap of the same weights: mean |few − many| in pixels and 1 − cos of their features.
Editing models (`model.editing`): each training prompt is sampled as an edit of its own source image(s), and
`dino_d_source` (sample vs its first source) says how far the edits move away from their sources, beside
`dino_d_source_target` (each target vs its source: the change the data asks for); unseen prompts are sampled
text-to-image (there is no source for them).
Writes eval.json and PNG grids (rows = prompts, columns = seeds) into the output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dopsd.core.sampler import generate, sample_seed, seed_noise
from dopsd.data.dataset import load_dataset, load_example_images
from dopsd.data.images import grid_image, to_pil, to_tensor
from dopsd.files import atomic_save_image, atomic_write_json
from dopsd.lora.trained import apply_trained
from dopsd.models.registry import load_adapter, torch_dtype
from dopsd.tools.features import TextImageScorer, cosine_distance, load_image_features

REPORT_FILES = r"eval\.json|targets\.png|sources\.png|(base|lora)_\d+steps\.png"  # what evaluate() writes


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean()) if x.numel() else float("nan")


def measure(
    few: torch.Tensor,
    many: torch.Tensor | None,
    prompts: list[str],
    seeds: int,
    n_train: int,
    targets: list[Image.Image],
    features: Any,
    scorer: TextImageScorer | None,
    sources: list[Image.Image] | None = None,
) -> dict[str, float]:
    """Metrics of one model's samples; rows are prompt-major (prompt i, seed j at i·seeds + j).
    sources: each training prompt's (first) source image, for editing models."""
    images = to_pil(few)
    f = features(images)
    t = features(targets)
    dist = cosine_distance(f, t)  # (samples, targets)
    rows = torch.arange(len(images))
    train = rows < n_train * seeds
    out: dict[str, float] = {
        "dino_d_train": _mean(dist[rows[train], rows[train] // seeds]),
        "dino_d_train_nearest": _mean(dist[train].min(dim=1).values),
        "dino_d_unseen_nearest": _mean(dist[~train].min(dim=1).values),
    }
    if sources is not None:
        to_source = cosine_distance(f[train], features(sources))
        out["dino_d_source"] = _mean(to_source[rows[train], rows[train] // seeds])
    if scorer is not None:
        clip = scorer([p for p in prompts for _ in range(seeds)], images)
        out["clip_s_train"], out["clip_s_unseen"] = _mean(clip[train]), _mean(clip[~train])
    if many is not None:
        out["gap_pixels"] = _mean((few - many).abs())
        out["gap_features"] = _mean(torch.diagonal(cosine_distance(f, features(to_pil(many)))))
    return out


def evaluate(
    config: Any,
    weights: Path | None,
    out_dir: Path,
    unseen: list[str] | None = None,
    seeds: list[int] = (0, 1),  # type: ignore[assignment]
    feature_model: str | None = None,
    clip_model: str | None = None,
    control_steps: int = 28,
    max_prompts: int = 8,
    compare_base: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    m = config.model
    examples = load_dataset(config.data, m)[:max_prompts]
    if not examples:
        raise ValueError(f"no training pairs in {config.data.path}")
    loaded = [load_example_images(ex) for ex in examples]
    targets = [target for target, _ in loaded]
    sources = [srcs for _, srcs in loaded] if m.editing else None  # edits are sampled from their own sources
    train_prompts = [ex.captions[0] for ex in examples]
    features = load_image_features(feature_model, device)
    scorer = TextImageScorer(clip_model, device) if clip_model else None

    adapter = load_adapter(m, device, torch_dtype(m.dtype))
    if unseen is None:  # the model's own: prompts it can read (the miniature has a fixed vocabulary)
        word = config.data.trigger_word
        unseen = adapter.unseen_prompts(word) if word else []
    prompts = train_prompts + list(unseen)
    contexts = adapter.student_contexts(train_prompts, sources) + (
        adapter.student_contexts(list(unseen), None) if unseen else []
    )
    adapter.release_encoders()
    seeds = list(seeds)
    rows = [c for c in contexts for _ in seeds]
    shape = adapter.latent_shape(m.height, m.width)
    noise = seed_noise(shape, [sample_seed(s, i) for i in range(len(prompts)) for s in seeds])
    few_sched = adapter.inference_schedule(m.height, m.width, m.inference_steps)
    few_steps = len(few_sched) - 1  # model.inference_steps may be null (= the model's own)
    many_sched = adapter.inference_schedule(m.height, m.width, control_steps) if control_steps else None
    # Grids are written with eval.json at the end: a LoRA that does not fit, or an interrupted run, leaves no
    # half report behind.
    grids = {"targets.png": grid_image(to_tensor(targets, (m.height, m.width)), 1, len(targets))}
    first_sources = [srcs[0] for srcs in sources] if sources else None
    if first_sources:
        grids["sources.png"] = grid_image(to_tensor(first_sources, (m.height, m.width)), 1, len(targets))

    report: dict[str, Any] = {
        "weights": str(weights) if weights else None,
        "family": m.family,
        "steps": few_steps,
        "control_steps": control_steps,
        "seeds": seeds,
        "train_prompts": train_prompts,
        "unseen_prompts": list(unseen),
        "feature_model": features.name,
        "clip_model": scorer.name if scorer else None,
        "note": "feature_model 'pixels' is a fallback, not comparable to the paper's DINO-D"
        if features.name == "pixels"
        else "",
        "editing": bool(m.editing),
    }
    if first_sources:
        report["dino_d_source_target"] = _mean(
            torch.diagonal(cosine_distance(features(targets), features(first_sources)))
        )
    n_edits = len(train_prompts) * len(seeds) if sources else 0

    def sample(schedule: torch.Tensor) -> torch.Tensor:
        parts = []
        if n_edits:  # one at a time: pairs may differ in source count and size (one set of position ids per batch)
            parts.append(generate(adapter, adapter.network, rows[:n_edits], noise[:n_edits], schedule, batch_size=1))
        if n_edits < len(rows):
            parts.append(generate(adapter, adapter.network, rows[n_edits:], noise[n_edits:], schedule))
        return torch.cat(parts)

    variants = (["base"] if compare_base else []) + (["lora"] if weights else [])
    for variant in variants:
        if variant == "lora":
            apply_trained(adapter.network, Path(weights))
        few = sample(few_sched)
        many = sample(many_sched) if many_sched is not None else None
        grids[f"{variant}_{few_steps}steps.png"] = grid_image(few, len(prompts), len(seeds))
        if many is not None:
            grids[f"{variant}_{control_steps}steps.png"] = grid_image(many, len(prompts), len(seeds))
        report[variant] = measure(
            few, many, prompts, len(seeds), len(train_prompts), targets, features, scorer, first_sources
        )
    for name, grid in grids.items():
        atomic_save_image(out_dir / name, grid)
    atomic_write_json(out_dir / "eval.json", report)
    return report
