"""Evaluation of one trained network on the miniature world: fixed prompts, fixed noise, the world's decoders.

Prompt sets per setting (each with its own fixed noise, identical for every method, seed and step):
  * train    – the training captions (concept: `sks` on the 2 shapes × 2 backgrounds of the data; domain: the
               dataset's captions);
  * unseen   – captions never in training (concept: the other shape × background combinations; domain: the
               rest of the caption space, including captions without a background);
  * unrelated – named-colour captions (no `sks`): where quality, drift and preservation are measured.
Metrics are computed from the renderer's ground truth (`dopsd.mini.metrics`), see FIELD_DOCS in results.py.
Besides, each curve point carries what a user's run can measure without ground truth: the done signal
(`dopsd.training.done`'s palette distance of the training prompts' samples to their captions' training images).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from dopsd.core.sampler import sample_euler
from dopsd.data.image_files import load_image
from dopsd.data.images import to_tensor
from dopsd.mini import metrics, world
from dopsd.mini.scoring import BACKGROUND, FOREGROUND, attribute_checks, colour_names, unrelated_accuracy
from dopsd.training.done import palette, palette_distance

# Preservation tolerances. The decoder fits centres on a 0.5-px grid and sizes on a 1-px grid, so re-decoding the
# same scene can move either by about a grid step; a shape that moved or resized by more than 1.5 px changed.
POSITION_TOL = 1.5  # px, per axis of the shape's centre
SIZE_TOL = 1.5  # px, of the shape's extent


def preserved(dec: metrics.Decoded, ref: metrics.Decoded) -> torch.Tensor:
    """(N,) bool: the decoded scene is the reference's — same shape, colour name and background name
    (tint-invariant names), centre within POSITION_TOL and extent within SIZE_TOL pixels."""
    same_names = [
        (a, f, b) == (ra, rf, rb)
        for a, f, b, ra, rf, rb in zip(
            dec.shape.tolist(),
            colour_names(dec.fg, FOREGROUND),
            colour_names(dec.bg, BACKGROUND),
            ref.shape.tolist(),
            colour_names(ref.fg, FOREGROUND),
            colour_names(ref.bg, BACKGROUND),
        )
    ]
    close = ((dec.cx - ref.cx).abs() <= POSITION_TOL) & ((dec.cy - ref.cy).abs() <= POSITION_TOL)
    close &= (dec.size - ref.size).abs() <= SIZE_TOL
    return torch.tensor(same_names) & close


def agreement(dec: metrics.Decoded, ref: metrics.Decoded) -> float:
    """Fraction of samples whose decoded scene is preserved (see `preserved`)."""
    return float(preserved(dec, ref).float().mean())


def geometry_change(dec: metrics.Decoded, ref: metrics.Decoded) -> dict[str, float]:
    """Mean shift of the shape's centre (Euclidean, px) and mean |change| of its extent (px), same shape only."""
    same = dec.shape == ref.shape
    if not bool(same.any()):
        return {"position_shift_px": float("nan"), "size_change_px": float("nan")}
    shift = torch.hypot(dec.cx - ref.cx, dec.cy - ref.cy)[same]
    return {"position_shift_px": float(shift.mean()), "size_change_px": float((dec.size - ref.size).abs()[same].mean())}


def attribute_accuracy(dec: metrics.Decoded, captions: list[str]) -> float:
    """Mean over samples of the fraction of captioned attributes (shape, colour, background) decoded right,
    tint-invariant (a domain-tinted red still counts as red)."""
    checks = attribute_checks(dec, captions)
    return sum(sum(c) / len(c) for c in checks) / len(checks)


def quality(images: torch.Tensor, captions: list[str], dec: metrics.Decoded, domain: bool) -> float:
    """`metrics.fewstep_quality`; in the domain setting the clean reference of an in-domain sample is tinted
    too (a tint lowers contrast by its amount, so a perfect tinted render would otherwise score 0.6)."""
    return metrics.fewstep_quality(images, captions, dec, tinted=metrics.in_tint(dec) if domain else None)


def domain_prompts() -> list[str]:
    """Every named-colour caption, with and without a background."""
    return [
        f"a {c} {s}" + (f" on a {b} background" if b else "")
        for c in world.COLOURS
        for s in world.SHAPES
        for b in (*world.BACKGROUNDS, None)
    ]


def _repeat(prompts: list[str], n: int) -> list[str]:
    if not prompts:
        raise ValueError("bench: an evaluation prompt set is empty")
    return [prompts[i % len(prompts)] for i in range(n)]


@dataclass
class PromptSet:
    captions: list[str]
    noise: torch.Tensor
    context: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Suite:
    """Fixed evaluation of one setting. `target` is a concept name or 'domain'."""

    target: str
    sets: dict[str, PromptSet]
    few_steps: int
    many_steps: int
    n_many: int  # unrelated prompts also sampled at many steps (the control; the costliest part)
    velocity: Any  # adapter.velocity(network, x, σ, context)
    schedule: Any  # adapter.inference_schedule(res, res, steps)
    reference: dict[str, torch.Tensor] = field(default_factory=dict)  # untouched turbo's samples
    reference_decoded: dict[str, metrics.Decoded] = field(default_factory=dict)
    done_targets: dict[str, torch.Tensor] = field(default_factory=dict)  # caption -> its training images' palettes

    @torch.no_grad()
    def sample(
        self, network: nn.Module, name: str, steps: int, limit: int | None = None, batch: int = 64
    ) -> torch.Tensor:
        ps = self.sets[name]
        n = len(ps.captions) if limit is None else min(limit, len(ps.captions))
        sched = self.schedule(steps)
        was_training = network.training
        network.eval()
        out = []
        try:
            for start in range(0, n, batch):
                end = min(start + batch, n)
                ctx = {k: v[start:end] for k, v in ps.context.items()}
                x = sample_euler(lambda z, s, c: self.velocity(network, z, s, c), ps.noise[start:end], sched, ctx)
                # a diverged network's NaN samples count as blank images: every metric stays defined and the
                # failure shows as lost fidelity and quality (and large drift)
                out.append(x.nan_to_num(0.0, 1.0, -1.0).clamp(-1, 1).float().cpu())
        finally:
            network.train(was_training)
        return torch.cat(out)

    def set_reference(self, network: nn.Module) -> None:
        """The untouched turbo's few-step samples on the unrelated prompts (same noise): drift/preservation."""
        self.reference["unrelated"] = self.sample(network, "unrelated", self.few_steps)
        self.reference_decoded["unrelated"] = metrics.decode(self.reference["unrelated"])

    @property
    def domain(self) -> bool:
        return self.target == "domain"

    def fidelity(self, images: torch.Tensor, dec: metrics.Decoded | None = None) -> float:
        dec = dec or metrics.decode(images)
        if self.target == "domain":
            return metrics.domain_fidelity(images, dec)
        return metrics.concept_fidelity(images, self.target, dec)

    def strict_fidelity(self, images: torch.Tensor, name: str, dec: metrics.Decoded | None = None) -> float:
        """Domain: the share of samples carrying the tint itself (amount, hue and chroma: over-tinting fails it,
        unlike `fidelity`, which only asks whether the background is nearer its tinted version)."""
        return metrics.tint_fidelity(images, self.sets[name].captions[: len(images)], decoded=dec)

    def tinted_ceiling(self, imgs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Domain: strict fidelity of the untouched turbo's own samples with the domain's tint added in pixel
        space, i.e. what a fine-tune that adds exactly the tint and changes nothing else scores (its unseen prompts
        include captions without a background, where the turbo's own samples sometimes blend backgrounds)."""
        return {
            key: self.strict_fidelity(world.add_tint(imgs[name], world.DOMAIN_TINT), name)
            for name, key in (("train", "tinted_strict_fidelity"), ("unseen", "tinted_unseen_strict_fidelity"))
        }

    def done_distances(self, images: torch.Tensor, name: str = "train") -> torch.Tensor:
        """The done signal of `dopsd train` on these samples, per sample: the palette distance to the nearest
        training image of the sample's caption (the signal is their mean)."""
        feats = palette(images)
        captions = self.sets[name].captions[: len(images)]
        return torch.stack(
            [palette_distance(feats[i : i + 1], self.done_targets[c]).min() for i, c in enumerate(captions)]
        )

    def curve_point(self, network: nn.Module, limit: int) -> dict[str, Any]:
        """The cheap per-interval measurement: fidelity on training prompts, quality and drift on unrelated ones,
        the done signal; for a domain also strict fidelity on the training and the unseen prompts."""
        train = self.sample(network, "train", self.few_steps, limit)
        unrelated = self.sample(network, "unrelated", self.few_steps, limit)
        dec = metrics.decode(unrelated)
        ref = self.reference["unrelated"][: unrelated.shape[0]]
        point = {
            "concept_fidelity": self.fidelity(train),
            "fewstep_quality": quality(unrelated, self.sets["unrelated"].captions[: len(unrelated)], dec, self.domain),
            "drift": metrics.drift(unrelated, ref),
        }
        if self.done_targets:
            per_sample = self.done_distances(train)
            point["done_distance"] = float(per_sample.mean())
            point["done_per_sample"] = per_sample.tolist()  # for the earliest step as good as the lowest
        if self.domain:
            point["strict_fidelity"] = self.strict_fidelity(train, "train")
            unseen = self.sample(network, "unseen", self.few_steps, limit)
            point["unseen_strict_fidelity"] = self.strict_fidelity(unseen, "unseen")
        return point

    def budget_point(self, network: nn.Module) -> dict[str, float]:
        """A domain at a budget: strict fidelity on the whole training and unseen sets, few-step quality on the
        whole unrelated set (the final evaluation's samples and sizes, without its many-step control)."""
        imgs = {name: self.sample(network, name, self.few_steps) for name in ("train", "unseen", "unrelated")}
        dec = metrics.decode(imgs["unrelated"])
        return {
            "strict_fidelity": self.strict_fidelity(imgs["train"], "train"),
            "unseen_strict_fidelity": self.strict_fidelity(imgs["unseen"], "unseen"),
            "fewstep_quality": quality(imgs["unrelated"], self.sets["unrelated"].captions, dec, self.domain),
        }

    def evaluate(self, network: nn.Module) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """All final metrics of `network` and the images they came from."""
        imgs = {
            "train": self.sample(network, "train", self.few_steps),
            "unseen": self.sample(network, "unseen", self.few_steps),
            "unrelated": self.sample(network, "unrelated", self.few_steps),
            "unrelated_many": self.sample(network, "unrelated", self.many_steps, self.n_many),
        }
        dec = {k: metrics.decode(v) for k, v in imgs.items()}
        unrelated = self.sets["unrelated"].captions
        out = {
            "concept_fidelity": self.fidelity(imgs["train"], dec["train"]),
            "unseen_prompt_fidelity": self.fidelity(imgs["unseen"], dec["unseen"]),
            "fewstep_quality": quality(imgs["unrelated"], unrelated, dec["unrelated"], self.domain),
            "manystep_quality": quality(
                imgs["unrelated_many"], unrelated[: self.n_many], dec["unrelated_many"], self.domain
            ),
            "preservation": agreement(dec["unrelated"], self.reference_decoded["unrelated"]),
            "drift": metrics.drift(imgs["unrelated"], self.reference["unrelated"]),
            "sharpness": metrics.sharpness(imgs["unrelated"]),
            "render_psnr": metrics.render_psnr(imgs["unrelated"], dec["unrelated"]),
            "attribute_accuracy": attribute_accuracy(dec["unrelated"], unrelated),
            "unrelated_accuracy": unrelated_accuracy(dec["unrelated"], unrelated),
            **geometry_change(dec["unrelated"], self.reference_decoded["unrelated"]),
            "fewstep_quality_concept": quality(imgs["train"], self.sets["train"].captions, dec["train"], self.domain),
        }
        if self.target != "domain":  # the concept leaking onto prompts that do not ask for it
            out["concept_leak"] = self.fidelity(imgs["unrelated"], dec["unrelated"])
        else:  # the domain on the original domain's prompts is intended; retention is attribute accuracy
            out["domain_on_unrelated"] = self.fidelity(imgs["unrelated"], dec["unrelated"])
            out["strict_fidelity"] = self.strict_fidelity(imgs["train"], "train", dec["train"])
            out["unseen_strict_fidelity"] = self.strict_fidelity(imgs["unseen"], "unseen", dec["unseen"])
        return out, imgs


def build_suite(
    adapter: Any,
    target: str,
    train_captions: list[str],
    n_train: int,
    n_unseen: int,
    n_unrelated: int,
    many_steps: int,
    n_many: int,
    seed: int = 0,
    train_images: dict[str, list[Path]] | None = None,
) -> Suite:
    """Prompt sets, noise and contexts (built with `adapter`'s encoder, before it is released); with
    `train_images` ({caption: its training images}) the done signal's targets too."""
    distinct = list(dict.fromkeys(train_captions))
    if target == "domain":
        unseen = [p for p in domain_prompts() if p not in distinct]
    else:
        unseen = [p for p in world.concept_prompts() if p not in distinct]
    prompt_lists = {
        "train": _repeat(distinct, n_train),
        "unseen": _repeat(unseen, n_unseen),
        "unrelated": world.unrelated_prompts(n_unrelated, seed=seed),
    }
    res = adapter.resolution
    sets = {}
    for i, (name, captions) in enumerate(prompt_lists.items()):
        g = torch.Generator().manual_seed(7_000 + 100 * seed + i)
        noise = torch.randn(len(captions), 3, res, res, generator=g)
        context = adapter.collate(adapter.student_contexts(captions))
        sets[name] = PromptSet(captions, noise, {k: v.detach().cpu() for k, v in context.items()})
    done_targets = {
        c: palette(to_tensor([load_image(p, (res, res)) for p in paths])) for c, paths in (train_images or {}).items()
    }
    return Suite(
        target=target,
        sets=sets,
        few_steps=adapter.default_steps,
        many_steps=many_steps,
        n_many=min(n_many, n_unrelated),
        velocity=adapter.velocity,
        schedule=lambda steps: adapter.inference_schedule(res, res, steps),
        done_targets=done_targets,
    )


# --- the de-distillation adapter (ai-toolkit style): merged while training, removed at inference --------


def lora_deltas(lora_state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """{module name: ΔW = scale · B @ A} from a peft-format LoRA state dict (`<module>.lora_A.weight`, …)."""
    deltas = {}
    for key, a in lora_state.items():
        if key.endswith("lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            b = lora_state[f"{module}.lora_B.weight"]
            deltas[module] = scale * (b.float() @ a.float())
    if not deltas:
        raise ValueError("bench: the de-distillation LoRA state has no lora_A/lora_B weights")
    return deltas


def _weight(network: nn.Module, module: str) -> torch.Tensor:
    layer = network.get_submodule(module)
    layer = getattr(layer, "base_layer", layer)  # a LoRA-wrapped layer keeps the frozen weight in base_layer
    return layer.weight


@torch.no_grad()
def add_deltas(network: nn.Module, deltas: dict[str, torch.Tensor], sign: float) -> None:
    for module, delta in deltas.items():
        w = _weight(network, module)
        w.add_(sign * delta.to(w))


@contextlib.contextmanager
def without_deltas(network: nn.Module, deltas: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Inference view of a network trained over a merged adapter: the adapter removed, then put back."""
    if deltas:
        add_deltas(network, deltas, -1.0)
    try:
        yield
    finally:
        if deltas:
            add_deltas(network, deltas, +1.0)
