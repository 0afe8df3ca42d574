"""`dopsd mini report`: measure the shipped (or given) base and turbo on what the miniature must show to stand in
for a real turbo:

0. attribute decoding of the untouched turbo at its step count (and the base at its many steps);
1. few-step quality: MSE to the base's many-step output for the same noise and prompt, sharpness;
2. teacher check on held-out concepts: caption + target image vs caption only (both teacher paths);
   and on held-out domains: tints of several hues carried from a reference image (`dopsd.mini.domains`);
3. the premise: the demo's SFT and D-OPSD runs (same pairs, budget, seed and prior preservation), plus SFT at 2×
   the steps, and the few-step quality of their samples on unrelated prompts,
   beside the untouched turbo's and the base's at the same step count; and a control: D-OPSD on the same
   scenes in a colour the turbo already knows, with that colour's word in the captions (no new concept to learn),
   which separates what the in-context teacher costs from what learning the concept costs; and both methods
   without the on-policy prior preservation of dopsd/configs/mini.yaml that the demo uses (its prompts are of the
   same family as the unrelated prompts measured here).
Each seed draws its own prompts, noise and targets; the table shows the mean and the per-seed range.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from dopsd.core.sampler import generate
from dopsd.mini import domains, world
from dopsd.mini import metrics as M
from dopsd.mini.adapter import MiniAdapter, load
from dopsd.mini.demo import CONCEPT, NO_PRIOR, STEPS, run_demo, train_method
from dopsd.mini.demo import evaluate as evaluate_demo


def _quality(images: torch.Tensor, captions: list[str], reference: torch.Tensor | None) -> dict[str, float]:
    dec = M.decode(images)
    out = {f"acc_{k}": v for k, v in M.attribute_accuracy(images, captions, dec).items()}
    out.update(
        sharpness=M.sharpness(images),
        fewstep_quality=M.fewstep_quality(images, captions, dec),
        render_psnr=M.render_psnr(images, dec),
    )
    if reference is not None:
        out["mse_to_base_many"] = M.mse(images, reference)
    return out


def _chunks(n: int, size: int = 128):
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def draw_noise(adapter: MiniAdapter, n: int, seed: int) -> torch.Tensor:
    """n noises from one generator (the report's tables were measured with this draw)."""
    res = adapter.resolution
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_many(
    adapter: MiniAdapter, captions: list[str], noise: torch.Tensor, steps: int | None = None, contexts=None
) -> torch.Tensor:
    """Samples at `steps` (default: the model's own) with caption-only contexts (or the given ones), in chunks
    of 128 whose contexts are encoded chunk by chunk."""
    schedule = adapter.inference_schedule(adapter.resolution, adapter.resolution, steps)
    parts = []
    for a, b in _chunks(len(captions)):
        ctx = adapter.student_contexts(captions[a:b]) if contexts is None else contexts[a:b]
        parts.append(generate(adapter, adapter.network, ctx, noise[a:b], schedule, batch_size=b - a))
    return torch.cat(parts)


@torch.no_grad()
def teacher_check(turbo: MiniAdapter, seed: int, n: int) -> dict[str, float]:
    """Concept fidelity with caption + target image vs caption only, for every held-out concept and path."""
    g = torch.Generator().manual_seed(40_000 + seed)
    out: dict[str, float] = {}
    draws = draw_noise(turbo, n, 50_000 + seed)
    for concept in world.CONCEPTS:
        scenes = [world.concept_scene(concept, g) for _ in range(n)]
        captions = [s.caption() for s in scenes]
        targets = world.render(scenes)
        alone = sample_many(turbo, captions, draws)
        out[f"{concept}:caption_only"] = M.concept_fidelity(alone, concept)
        for path in ("vlm", "reference"):
            turbo.teacher_context = path
            ctx = turbo.teacher_contexts_from_tensors(captions, targets)
            out[f"{concept}:caption+image({path})"] = M.concept_fidelity(
                sample_many(turbo, captions, draws, contexts=ctx), concept
            )
        turbo.teacher_context = "vlm"
    return out


@torch.no_grad()
def evaluate(turbo: MiniAdapter, base: MiniAdapter, seed: int, n: int = 256) -> dict[str, dict[str, float]]:
    captions = world.unrelated_prompts(n, seed)
    draws = draw_noise(turbo, n, seed)
    ts, bs = turbo.default_steps, base.default_steps
    many = sample_many(base, captions, draws, bs)
    rows = {
        f"base@{bs}": _quality(many, captions, None),
        f"turbo@{ts}": _quality(sample_many(turbo, captions, draws, ts), captions, many),
        f"base@{ts}": _quality(sample_many(base, captions, draws, ts), captions, many),
    }
    for steps in (2, 1):
        rows[f"turbo@{steps}"] = _quality(sample_many(turbo, captions, draws, steps), captions, many)
        rows[f"base@{steps}"] = _quality(sample_many(base, captions, draws, steps), captions, many)
    g = torch.Generator().manual_seed(seed)
    clean_scenes = [world.random_scene(g) for _ in range(n)]
    clean = world.render(clean_scenes)
    rows["clean renders"] = _quality(clean, [s.caption() for s in clean_scenes], None)
    rows["teacher check"] = teacher_check(turbo, seed, n // 2)
    # held-out domains, tints of several hues: references of another scene, and in the target's colours (what
    # D-OPSD's teacher sees: the training image of its caption)
    rows["tint check"] = domains.teacher_check(turbo, seed, n // 2)
    rows["tint check, same colours"] = domains.teacher_check(turbo, seed, n // 2, same_colours=True)
    return rows


def premise(pretrained: str, seed: int, steps: int | None = None) -> dict[str, dict[str, float]]:
    """The premise: `dopsd demo` (SFT and D-OPSD LoRAs on the held-out concept, both with mini.yaml's prior
    preservation) with this seed, in a scratch folder, plus the longer SFT run, the known-colour control and both
    methods without prior preservation."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        summary = run_demo(Path(tmp) / "demo", steps=steps, seed=seed, pretrained=pretrained)
        rows = {k: v for k, v in summary.items() if isinstance(v, dict)}
        # SFT learns the concept more slowly: also at 2× the budget
        longer = 2 * (steps or STEPS)
        data = Path(tmp) / "demo" / "data"
        weights = {"sft_long": train_method("sft", data, Path(tmp) / "sft_long", seed, pretrained, longer)}
        known = Path(tmp) / "known_colour"
        world.write_pairs(known, known_colour_scenes(seed))
        weights["known"] = train_method("dopsd", known, Path(tmp) / "dopsd_known", seed, pretrained, steps)
        for method in ("sft", "dopsd"):
            weights[f"{method}_noprior"] = train_method(
                method, data, Path(tmp) / f"{method}_noprior", seed, pretrained, steps, NO_PRIOR
            )
        results, _ = evaluate_demo(pretrained, {"before": None, **weights}, 64, seed)
    rows[f"sft, {longer} steps"] = results["sft_long"]
    rows[f"dopsd, no new concept ({KNOWN_COLOUR})"] = results["known"]
    for method in ("sft", "dopsd"):
        rows[f"{method} without prior preservation"] = results[f"{method}_noprior"]
    return rows


KNOWN_COLOUR = "red"  # a named colour: the turbo already renders it


def known_colour_scenes(seed: int) -> list[world.Scene]:
    """The demo's training scenes in a colour the turbo knows, captioned with its name instead of `sks`."""
    return [
        replace(s, fg=world.COLOURS[KNOWN_COLOUR], colour=KNOWN_COLOUR)
        for s in world.concept_scenes(CONCEPT, seed=seed)
    ]


def _summ(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} [{min(values):.3f}–{max(values):.3f}]"


def to_markdown(per_seed: list[dict[str, dict[str, float]]], header: str) -> str:
    cols = [
        "acc_shape",
        "acc_colour",
        "acc_background",
        "mse_to_base_many",
        "sharpness",
        "fewstep_quality",
        "render_psnr",
    ]
    lines = [header, "", "| model @ steps | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in per_seed[0]:
        if row in ("teacher check", "tint check", "tint check, same colours", "premise"):
            continue
        cells = []
        for c in cols:
            vals = [s[row][c] for s in per_seed if c in s[row]]
            cells.append(_summ(vals) if vals else "–")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "| teacher check (turbo, its own steps) | concept fidelity |", "|---|---|"]
    for key in per_seed[0]["teacher check"]:
        lines.append(f"| {key} | {_summ([s['teacher check'][key] for s in per_seed])} |")
    for key, same in (("tint check", False), ("tint check, same colours", True)):
        if key in per_seed[0]:
            lines += domains.to_markdown([s[key] for s in per_seed], same_colours=same).splitlines()
    if "premise" in per_seed[0]:
        cols = ["concept_fidelity", "fewstep_quality", "drift"]
        lines += ["", "| premise (`dopsd demo`, 4 steps) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name in per_seed[0]["premise"]:
            cells = [_summ([s["premise"][name][c] for s in per_seed]) for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_report(
    seeds: int = 2,
    n: int = 256,
    pretrained: str | None = None,
    out: str | None = None,
    with_premise: bool = True,
    premise_steps: int | None = None,
) -> str:
    """Evaluate turbo and base (shipped, or a recipe folder) over `seeds` seeds; return (and write) markdown."""
    torch.manual_seed(0)
    if pretrained is None:
        turbo, base = load(SimpleNamespace(pretrained="turbo")), load(SimpleNamespace(pretrained="base"))
        source = "shipped weights"
    else:
        folder = Path(pretrained)
        turbo = load(SimpleNamespace(pretrained=str(folder / "turbo.safetensors")))
        base = load(SimpleNamespace(pretrained=str(folder / "base.safetensors")))
        source = str(folder)
    per_seed = [evaluate(turbo, base, seed, n) for seed in range(seeds)]
    if with_premise:
        for seed, rows in enumerate(per_seed):
            rows["premise"] = premise(str(pretrained or "turbo"), seed, premise_steps)
    header = (
        f"Miniature world, {source}: {seeds} seeds × {n} unrelated prompts (mean [min–max] over seeds). "
        "mse_to_base_many = MSE to the base's many-step sample for the same noise and prompt; "
        "fewstep_quality = sharpness relative to the clean render of each sample's decoded scene in its caption's "
        "colours, with the world's grain (≤ 1, higher = better); render_psnr = PSNR against the best-fitting clean "
        "render. Premise: `dopsd demo --seed S` per seed (concept_fidelity on `sks` prompts; fewstep_quality "
        "and drift on unrelated prompts; see dopsd/mini/demo.py). 'no new concept': D-OPSD on the same scenes in "
        f"{KNOWN_COLOUR}, captioned `{KNOWN_COLOUR}` (a colour the turbo knows: nothing new to learn); "
        "The demo's runs use the on-policy prior term of dopsd/configs/mini.yaml (named-colour prompts); "
        "'without prior preservation': the same runs with it off."
    )
    text = to_markdown(per_seed, header)
    if out:
        Path(out).write_text(text)
        Path(out).with_suffix(".json").write_text(json.dumps(per_seed, indent=2) + "\n")
    return text
