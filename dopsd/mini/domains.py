"""Teacher check for domains: can the turbo carry a held-out tint from a reference image in its context?

A domain here is a global tint (every pixel mixed toward a colour). D-OPSD's teacher is the turbo itself,
conditioned on the caption plus a reference image; a claim about learning a domain can only be judged when
that teacher renders the reference's tint. This check samples the turbo at its own step count on ordinary
named-colour captions, each with a reference image under the same tint (of *another* scene, or of one in the
target's own colours: what D-OPSD's teacher sees, the training image of its caption), through both
teacher paths (the encoder, "vlm", and reference patches in the DiT sequence, "reference"), with caption only
as the control, and counts the samples whose decoded colours carry the tint — amount and hue
(`metrics.shows_tint`: the tint fitted from the decoded foreground/background against the caption's named
colours, within `metrics.TINT_AMOUNT_TOL`, `TINT_HUE_TOL` and `TINT_CHROMA_TOL`).

Test tints: the held-out domain (sepia, `world.DOMAIN_TINT`) and six tints spread around the hue circle at
sepia's saturation, value and amount. None is used as such in training, where tints are drawn from the
continuous RGB cube (as the held-out concept colours are never named but lie in the cube of in-context colours).
"""

from __future__ import annotations

import colorsys
import statistics
from dataclasses import replace

import torch

from dopsd.core.sampler import generate
from dopsd.mini import metrics as M
from dopsd.mini import world

Tint = tuple[tuple[float, float, float], float]


def _hue_tint(hue_deg: float) -> Tint:
    """A tint of sepia's saturation, value and amount at another hue."""
    (r, g, b), amount = world.DOMAIN_TINT
    _, s, v = colorsys.rgb_to_hsv(r, g, b)
    colour = colorsys.hsv_to_rgb(hue_deg / 360, s, v)
    return tuple(round(c, 4) for c in colour), amount  # type: ignore[return-value]


TEST_TINTS: dict[str, Tint] = {
    "sepia (domain)": world.DOMAIN_TINT,
    "rose 0°": _hue_tint(0),
    "lemon 60°": _hue_tint(60),
    "mint 120°": _hue_tint(120),
    "aqua 180°": _hue_tint(180),
    "azure 240°": _hue_tint(240),
    "violet 300°": _hue_tint(300),
}
CONDITIONS = ("caption_only", "caption+image(vlm)", "caption+image(reference)")


def tint_pairs(
    tint: Tint, n: int, seed: int, same_colours: bool = False
) -> tuple[list[world.Scene], list[world.Scene]]:
    """n target scenes under `tint` (named colours, captions with a background) and, for each, a reference:
    another random scene under the same tint, or (same_colours) one in the target's colours and background
    with its own shape, position and size: what D-OPSD's teacher sees (the training image of the caption)."""
    g = torch.Generator().manual_seed(60_000 + seed)
    targets = [replace(world.random_scene(g), tint=tint) for _ in range(n)]
    refs = [replace(world.random_scene(g), tint=tint) for _ in range(n)]
    if same_colours:
        refs = [world.in_colours_of(r, t) for r, t in zip(refs, targets)]
    return targets, refs


@torch.no_grad()
def _sample(adapter, captions: list[str], noise: torch.Tensor, steps: int | None, contexts=None) -> torch.Tensor:
    schedule = adapter.inference_schedule(adapter.resolution, adapter.resolution, steps)
    parts = []
    for a in range(0, len(captions), 128):
        b = min(len(captions), a + 128)
        ctx = adapter.student_contexts(captions[a:b]) if contexts is None else contexts[a:b]
        parts.append(generate(adapter, adapter.network, ctx, noise[a:b], schedule, batch_size=b - a).cpu())
    return torch.cat(parts)


@torch.no_grad()
def teacher_check(
    adapter,
    seed: int,
    n: int,
    tints: dict[str, Tint] | None = None,
    steps: int | None = None,
    same_colours: bool = False,
) -> dict[str, float]:
    """Per tint and condition: the fraction of samples carrying the tint (`"{tint}:{condition}"`), the mean
    fitted amount (`…:amount`) and the median hue error in degrees (`…:hue_err`). Same noise and captions
    for every condition; `steps` defaults to the adapter's own; references as `tint_pairs` draws them. Leaves
    `adapter.teacher_context` as it was."""
    out: dict[str, float] = {}
    res = adapter.resolution
    noise = torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(70_000 + seed))
    before = adapter.teacher_context
    try:
        for name, tint in (tints or TEST_TINTS).items():
            targets, refs = tint_pairs(tint, n, seed, same_colours)
            captions = [s.caption() for s in targets]
            reference_images = world.render(refs)
            for condition in CONDITIONS:
                if condition == "caption_only":
                    images = _sample(adapter, captions, noise, steps)
                else:
                    adapter.teacher_context = condition[len("caption+image(") : -1]
                    ctx = adapter.teacher_contexts_from_tensors(captions, reference_images)
                    images = _sample(adapter, captions, noise, steps, ctx)
                fit = M.fit_tint(images, M.decode(images), captions)
                key = f"{name}:{condition}"
                out[key] = float(M.shows_tint(fit, tint).float().mean())
                out[f"{key}:amount"] = float(fit.amount.mean())
                out[f"{key}:hue_err"] = float(M.hue_error(fit.colour, tint[0]).median())
    finally:
        adapter.teacher_context = before
    return out


def _summ(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def to_markdown(per_seed: list[dict[str, float]], same_colours: bool = False) -> str:
    """The check as a table: one row per tint; fidelity per condition, then fitted amount and hue error with
    the image in context (vlm / reference). `same_colours`: the references were drawn so (`tint_pairs`)."""
    names = [k.split(":")[0] for k in per_seed[0] if k.endswith(":caption_only")]
    tol = f"amount ±{M.TINT_AMOUNT_TOL}, hue ±{M.TINT_HUE_TOL:.0f}°, chroma ±{M.TINT_CHROMA_TOL:.0%}"
    head = [
        "tint (RGB, amount)",
        "caption only",
        "+ image (vlm)",
        "+ image (reference)",
        "amount vlm / ref",
        "hue error ° vlm / ref",
    ]
    lines = [f"| {' | '.join(head)} |", "|---" * len(head) + "|"]
    for name in names:
        cells = [_summ([s[f"{name}:{c}"] for s in per_seed]) for c in CONDITIONS]
        amount = " / ".join(_summ([s[f"{name}:{c}:amount"] for s in per_seed], 2) for c in CONDITIONS[1:])
        hue = " / ".join(_summ([s[f"{name}:{c}:hue_err"] for s in per_seed], 0) for c in CONDITIONS[1:])
        colour, a = TEST_TINTS.get(name) or (None, None)
        label = f"{name} ({', '.join(f'{v:.2f}' for v in colour)}; {a})" if colour else name
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {amount} | {hue} |")
    reference = (
        "a reference image in the target's colours and background (its own layout)"
        if same_colours
        else "a reference image of another scene"
    )
    intro = (
        f"Tint teacher check (turbo at its own steps; caption + {reference} under the tint; fraction of samples "
        f"carrying the tint: {tol}):"
    )
    return "\n".join(["", intro, "", *lines]) + "\n"
