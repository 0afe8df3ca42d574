"""Measurements from the renderer's ground truth.

Decoder: every sample is fitted by a bank of clean shape masks (shape × position × size grid) with free
foreground/background colours (closed-form least squares); the best fit gives the decoded shape, size,
position, colours and the fit error. Free colours make it work for continuous concept colours and tints.

  attribute_accuracy – fraction of samples whose decoded shape / colour / background match the caption
  concept_fidelity   – fraction of samples whose foreground colour is the held-out concept's colour
  sharpness          – mean |4-neighbour Laplacian| (blur lowers it; compare with `clean_sharpness`)
  render_psnr        – PSNR (dB) of each sample against its best-fitting clean render: how much a sample looks
                       like a crisp image of the world; blur and speckle both lower it
  fewstep_quality    – higher = better: sharpness relative to the clean renders of the decoded scenes, capped
                       at 1, times the fraction of samples that fit a clean render within 1 dB... see below
  drift              – MSE to the untouched turbo's samples for the same noise and prompts (lower = better)
Images are (B, 3, R, R) in [-1, 1]. A plain nearest-render error is NOT used as a quality score: it rewards
blur when samples are imperfect.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from dopsd.mini import world


@functools.lru_cache(maxsize=1)
def templates() -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder bank: (J, 4) rows (shape, cx, cy, size) and (J, P) coverage masks. Sizes on a 1-px grid,
    centres on a 0.5-px grid over each size's allowed range (≈ 8,500 templates; built once, ~1 s)."""
    rows = []
    lo_s, hi_s = world.SIZE_RANGE
    for size in torch.arange(lo_s, hi_s + 1e-6, 1.0).tolist():
        lo, hi = world.MARGIN + size / 2, world.RES - world.MARGIN - size / 2
        centres = torch.arange(lo, hi + 1e-6, 0.5).tolist()
        rows += [(k, x, y, size) for k in range(len(world.SHAPES)) for y in centres for x in centres]
    params = torch.tensor(rows)
    masks = torch.cat([world.shape_masks(*params[i : i + 512].T) for i in range(0, len(params), 512)])
    return params, masks.reshape(len(params), -1).double()


@dataclass
class Decoded:
    shape: torch.Tensor  # (N,) index into world.SHAPES
    cx: torch.Tensor  # (N,) centre and extent in pixels (on the template grid: 0.5 px, 1 px)
    cy: torch.Tensor
    size: torch.Tensor
    fg: torch.Tensor  # (N, 3) RGB in [0, 1]
    bg: torch.Tensor
    fit_mse: torch.Tensor  # (N,) per-pixel MSE of the best fit, in [-1, 1] units
    fit: torch.Tensor  # (N, 3, R, R) the best-fitting clean render in [-1, 1]
    mask: torch.Tensor  # (N, R, R) its coverage


def _decode_chunk(images: torch.Tensor) -> Decoded:
    params, flat = templates()
    sm, smm = flat.sum(1), (flat**2).sum(1)
    x = ((images.detach().double().cpu() + 1) / 2).reshape(images.shape[0], 3, -1)  # (N, 3, P) in [0, 1]
    p = x.shape[-1]
    suu, suw, sww = p - 2 * sm + smm, sm - smm, smm  # u = 1 − m, w = m
    sx = x.sum(-1, keepdim=True)  # (N, 3, 1)
    swx = x @ flat.T  # (N, 3, J)
    sux = sx - swx
    det = (suu * sww - suw**2).clamp_min(1e-9)
    b = (sww * sux - suw * swx) / det
    f = (suu * swx - suw * sux) / det
    sxx = (x**2).sum(-1, keepdim=True)
    resid = sxx - 2 * (b * sux + f * swx) + b**2 * suu + 2 * b * f * suw + f**2 * sww  # (N, 3, J)
    best = resid.sum(1).argmin(1)  # (N,)
    idx = torch.arange(x.shape[0])
    fg, bg = f[idx, :, best], b[idx, :, best]
    m = flat[best].reshape(-1, 1, world.RES, world.RES)
    fit = (bg[:, :, None, None] * (1 - m) + fg[:, :, None, None] * m).float() * 2 - 1
    fit_mse = (fit - images.detach().float().cpu()).pow(2).mean((1, 2, 3))
    sh, cx, cy, size = params[best].T
    return Decoded(sh.long(), cx, cy, size, fg.float(), bg.float(), fit_mse, fit, m[:, 0].float())


@torch.no_grad()
def decode(images: torch.Tensor) -> Decoded:
    """Best clean-render fit of each image (shape/position/size templates × free fg/bg colours)."""
    parts = [_decode_chunk(images[i : i + 64]) for i in range(0, len(images), 64)]
    return Decoded(*(torch.cat([getattr(d, f.name) for d in parts]) for f in fields(Decoded)))


def parse_caption(caption: str) -> tuple[str, str, str | None]:
    """(colour word, shape, background or None) of a caption of the form 'a COLOUR SHAPE [on a BG background]'."""
    world.tokenize(caption)  # vocabulary check
    words = caption.lower().split()
    colour = next((w for w in words if w in world.COLOURS or w == world.PLACEHOLDER), None)
    shape = next((w for w in words if w in world.SHAPES), None)
    bg = next((w for w in words if w in world.BACKGROUNDS), None)
    if colour is None or shape is None:
        raise ValueError(f"caption {caption!r} names no colour or no shape; metrics need both")
    return colour, shape, bg


def _nearest(rgb: torch.Tensor, palette: dict[str, tuple[float, float, float]]) -> list[str]:
    names = list(palette)
    d = world.colour_distance(rgb[:, None], torch.tensor([palette[n] for n in names])[None])
    return [names[i] for i in d.argmin(1).tolist()]


def attribute_accuracy(images: torch.Tensor, captions: list[str], decoded: Decoded | None = None) -> dict[str, float]:
    """Per captioned attribute: fraction of samples decoded as the caption says (`sks` colours are skipped)."""
    dec = decoded or decode(images)
    parsed = [parse_caption(c) for c in captions]
    colours, bgs = _nearest(dec.fg, world.COLOURS), _nearest(dec.bg, world.BACKGROUNDS)
    shape_ok = [world.SHAPES[int(s)] == p[1] for s, p in zip(dec.shape, parsed)]
    colour_ok = [c == p[0] for c, p in zip(colours, parsed) if p[0] != world.PLACEHOLDER]
    bg_ok = [b == p[2] for b, p in zip(bgs, parsed) if p[2] is not None]
    out = {"shape": sum(shape_ok) / len(shape_ok)}
    if colour_ok:
        out["colour"] = sum(colour_ok) / len(colour_ok)
    if bg_ok:
        out["background"] = sum(bg_ok) / len(bg_ok)
    return out


def shows_colour(fg: torch.Tensor, target: tuple[float, float, float], max_dist: float = 0.25) -> torch.Tensor:
    """(N,) bool: the foreground is nearer `target` than every named colour, and within `max_dist` of it."""
    named = torch.tensor(list(world.COLOURS.values()))
    d_target = world.colour_distance(fg, torch.tensor(target))
    d_named = world.colour_distance(fg[:, None], named[None]).min(1).values
    return (d_target < d_named) & (d_target < max_dist)


def concept_fidelity(images: torch.Tensor, concept: str, decoded: Decoded | None = None) -> float:
    """Fraction of samples showing the held-out concept (its colour on the shape)."""
    if concept not in world.CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; choose one of {sorted(world.CONCEPTS)}")
    dec = decoded or decode(images)
    return float(shows_colour(dec.fg, world.CONCEPTS[concept]).float().mean())


def in_tint(dec: Decoded, tint=world.DOMAIN_TINT) -> torch.Tensor:
    """(N,) bool: the decoded background is nearer its tinted version (`tint`: colour, amount; default the held-out
    domain's) than any plain background."""
    colour, amount = torch.tensor(tint[0]), tint[1]
    plain = torch.tensor(list(world.BACKGROUNDS.values()))
    tinted = (1 - amount) * plain + amount * colour
    d_plain = world.colour_distance(dec.bg[:, None], plain[None]).min(1).values
    return world.colour_distance(dec.bg[:, None], tinted[None]).min(1).values < d_plain


def domain_fidelity(images: torch.Tensor, decoded: Decoded | None = None) -> float:
    """Fraction of samples whose background is nearer its tinted (held-out domain) version than any plain one.

    Hue-blind (a background tinted toward another warm colour passes too): `tint_fidelity` fits the tint."""
    return float(in_tint(decoded or decode(images)).float().mean())


# The per-sample tint test. A tint mixes every pixel toward colour t by amount a: a scene whose caption names its
# foreground f and background b renders as fg' = (1−a)·f + a·t and bg' = (1−a)·b + a·t. From the sample's fg'/bg'
# (`region_colours`) and the caption's named f/b, (1−a) is the ratio of the decoded to the named fg−bg contrast (least squares over
# RGB) and a·t the mean remaining offset: amount and colour (hence hue) of the tint, with the fit's residual.
# Captions without a background are fitted with each named background and keep the best fit.
# Tolerances of `shows_tint`. Clean renders of the tinted world (grain included) fit within 0.06 in amount and
# 6° in hue (420 scenes per test tint of `dopsd.mini.domains`); the grain shifts the fitted colour along grey,
# which moves neither hue nor chroma, so those are the tested properties rather than the RGB distance.
TINT_AMOUNT_TOL = 0.10  # |fitted − reference amount| (the recipe's tints span 0.25–0.5)
TINT_HUE_TOL = 15.0  # degrees: a quarter of the 60° between the test hues of `dopsd.mini.domains`
TINT_CHROMA_TOL = 0.5  # relative: the fitted tint colour's chroma (max − min of RGB) within ±50% of the reference's


@dataclass
class TintFit:
    amount: torch.Tensor  # (N,) fitted a (0 = untinted)
    colour: torch.Tensor  # (N, 3) fitted t in [0, 1] units (meaningless where amount ≈ 0)
    residual: torch.Tensor  # (N,) RMS error of the fit over the 6 decoded channels


def region_colours(images: torch.Tensor, decoded: Decoded) -> tuple[torch.Tensor, ...]:
    """(N, 3) mean foreground and background colours in [0, 1] over pixels at least one pixel inside / outside the
    decoded shape, and (N,) their pixel counts: the fitted template sits on a 0.5-px grid, so its border pixels
    mix the two colours (a contrast loss that would read as a tint); the decoder's fitted colours where a region
    is empty."""
    x = ((images.detach().float().cpu() + 1) / 2).flatten(2)  # (N, 3, P)
    m = decoded.mask[:, None]
    inner = (-F.max_pool2d(-m, 3, 1, 1) > 0.999).flatten(1).float()  # eroded shape
    outer = (F.max_pool2d(m, 3, 1, 1) < 0.001).flatten(1).float()  # outside the dilated shape

    def mean(w: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        n = w.sum(1, keepdim=True)
        return torch.where(n > 0, (x * w[:, None]).sum(-1) / n.clamp_min(1), fallback)

    return mean(inner, decoded.fg), mean(outer, decoded.bg), inner.sum(1), outer.sum(1)


COLOUR_NOISE = 0.02  # assumed per-channel noise of a region's mean colour besides the grain (weights the fit)


def fit_tint(images: torch.Tensor, decoded: Decoded, captions: list[str]) -> TintFit:
    """Fit a global tint to each sample given its caption's named colours (named-colour captions only).

    Generalised least squares: the grain leaves a luminance offset (equal in R, G and B) of std
    GRAIN/√pixels in each region's mean colour, so contrast along grey is trusted less than chromatic contrast
    (a small plus has only a few inner pixels)."""
    named_bgs = torch.tensor(list(world.BACKGROUNDS.values()))
    f, cand = [], []
    for caption in captions:
        colour, _, background = parse_caption(caption)
        if colour not in world.COLOURS:
            raise ValueError(
                f"caption {caption!r}: a tint is fitted against the caption's named colour; {colour!r} names none"
            )
        f.append(world.COLOURS[colour])
        cand.append(
            torch.tensor(world.BACKGROUNDS[background]).expand(len(named_bgs), 3)
            if background is not None
            else named_bgs
        )
    f = torch.tensor(f)[:, None]  # (N, 1, 3)
    b = torch.stack(cand)  # (N, K, 3) candidate named backgrounds
    fg, bg, n_fg, n_bg = region_colours(images, decoded)
    fg, bg = fg[:, None], bg[:, None]
    grey = world.GRAIN**2 * (1 / n_fg.clamp_min(1) + 1 / n_bg.clamp_min(1))
    c = (grey / (COLOUR_NOISE**2 + 3 * grey))[:, None]  # Σ⁻¹ ∝ I − c·11ᵀ

    def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u * v).sum(-1) - c * u.sum(-1) * v.sum(-1)

    d, dd = f - b, fg - bg
    keep = dot(dd, d) / dot(d, d).clamp_min(1e-6)  # (N, K): 1 − a
    offset = ((fg - keep[..., None] * f) + (bg - keep[..., None] * b)) / 2  # a·t
    miss = dd - keep[..., None] * d
    best = dot(miss, miss).argmin(1)
    idx = torch.arange(len(captions))
    amount = 1 - keep[idx, best]
    colour = offset[idx, best] / amount.clamp_min(0.05)[:, None]
    residual = (miss[idx, best].pow(2).sum(-1) / 2 / 6).sqrt()
    return TintFit(amount, colour, residual)


def shows_tint(
    fit: TintFit,
    tint: tuple[tuple[float, float, float], float],
    amount_tol: float = TINT_AMOUNT_TOL,
    hue_tol: float = TINT_HUE_TOL,
    chroma_tol: float = TINT_CHROMA_TOL,
) -> torch.Tensor:
    """(N,) bool: the fitted tint has the reference's amount (± amount_tol), hue (± hue_tol degrees; not tested
    for a near-grey reference, whose hue is undefined) and chroma (± chroma_tol of the reference's)."""
    colour, amount = tint
    ref = torch.tensor(colour)
    ref_chroma = float(ref.max() - ref.min())
    chroma = fit.colour.max(-1).values - fit.colour.min(-1).values
    ok = (fit.amount - amount).abs() <= amount_tol
    ok &= (chroma - ref_chroma).abs() <= max(chroma_tol * ref_chroma, 0.05)
    if ref_chroma >= 0.1:
        ok &= hue_error(fit.colour, colour) <= hue_tol
    return ok


def tint_fidelity(
    images: torch.Tensor, captions: list[str], tint=world.DOMAIN_TINT, decoded: Decoded | None = None
) -> float:
    """Fraction of samples carrying `tint` (amount and hue; `shows_tint`), default the held-out domain's."""
    dec = decoded or decode(images)
    return float(shows_tint(fit_tint(images, dec, captions), tint).float().mean())


def hue(rgb: torch.Tensor) -> torch.Tensor:
    """(…,) hue in degrees [0, 360) of (…, 3) RGB colours."""
    r, g, b = rgb.unbind(-1)
    mx, mn = rgb.max(-1).values, rgb.min(-1).values
    c = (mx - mn).clamp_min(1e-6)
    h = torch.where(mx == r, ((g - b) / c) % 6, torch.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return (h * 60) % 360


def hue_error(colour: torch.Tensor, target: tuple[float, float, float]) -> torch.Tensor:
    """(N,) circular hue difference in degrees between fitted tint colours and a target colour."""
    diff = (hue(colour) - hue(torch.tensor(target))).abs()
    return torch.minimum(diff, 360 - diff)


_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).reshape(1, 1, 3, 3).repeat(3, 1, 1, 1)


def sharpness_per_sample(images: torch.Tensor) -> torch.Tensor:
    return F.conv2d(images.detach().float().cpu(), _LAPLACE, groups=3).abs().mean((1, 2, 3))


def sharpness(images: torch.Tensor) -> float:
    """Mean |Laplacian| (clean renders ≈ `clean_sharpness()`; blurred samples score lower)."""
    return float(sharpness_per_sample(images).mean())


def clean_sharpness(n: int = 512, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    return sharpness(world.render([world.random_scene(g) for _ in range(n)]))


def render_psnr(images: torch.Tensor, decoded: Decoded | None = None) -> float:
    """PSNR (dB) of the samples against their best-fitting clean renders (of the mean fit MSE, so that a few
    perfect fits cannot hide bad samples). Blur, superposed modes and speckle all lower it."""
    dec = decoded or decode(images)
    return world.sigma_to_psnr(float(dec.fit_mse.mean()))


def reference_renders(captions: list[str], decoded: Decoded, tinted: torch.Tensor | None = None) -> torch.Tensor:
    """Clean renders (with a fixed grain texture) of each sample's decoded shape/size/position in its caption's
    colours (decoded colours where the caption does not name them: `sks`, no background); samples flagged in
    `tinted` (N,) bool are rendered under the held-out domain's tint, as the world renders them."""
    fg, bg = decoded.fg.clone(), decoded.bg.clone()
    for i, caption in enumerate(captions):
        colour, _, background = parse_caption(caption)
        if colour in world.COLOURS:
            fg[i] = torch.tensor(world.COLOURS[colour])
        if background is not None:
            bg[i] = torch.tensor(world.BACKGROUNDS[background])
    tint = None
    if tinted is not None:
        colour, amount = world.DOMAIN_TINT
        tint = (torch.tensor(colour).expand(len(captions), 3), tinted.float() * amount)
    grain = 2 * world.grain_texture(list(range(len(captions))))[:, None]  # fixed grain: expected texture energy
    return (world.composite(decoded.mask, fg, bg, tint) + grain).clamp(-1, 1)


def fewstep_quality(
    images: torch.Tensor, captions: list[str], decoded: Decoded | None = None, tinted: torch.Tensor | None = None
) -> float:
    """Higher = better, 1 = as sharp as clean renders: Σ sharpness(samples) / Σ sharpness(references), capped
    at 1 (speckle cannot beat a clean render), where each sample's reference is the clean render of its decoded
    shape, size and position in its caption's colours, with the world's grain texture.

    Blur and lost fine texture (the failure mode of fine-tuned few-step models: posterior means) and
    washed-out or missing objects lower it; the per-sample reference makes it independent of which
    shapes/colours were drawn. Excess noise is not penalised: report `render_psnr` beside it.
    `tinted`: see `reference_renders` (the domain setting).
    """
    dec = decoded or decode(images)
    ref = reference_renders(captions, dec, tinted)
    ratio = sharpness_per_sample(images).sum() / sharpness_per_sample(ref).sum().clamp_min(1e-6)
    return float(ratio.clamp(max=1.0))


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).pow(2).mean())


def drift(images: torch.Tensor, reference: torch.Tensor) -> float:
    """MSE to the untouched turbo's samples for the same noise and prompts (lower = better)."""
    return mse(images, reference)
