"""The miniature world: a procedural renderer with ground truth, captions from a fixed vocabulary.

A scene is one shape (circle, square, triangle, plus) of a colour on a plain background, with a continuous
position and size. Captions name the colour, the shape and (optionally) the background, and never the
position or size: every caption has a spread-out image distribution whose posterior mean stays blurred until
late in sampling, which is what makes few-step sampling hard, as with real captions. (Continuous rather than
discrete placements keep the base's ODE a smooth function of the noise, so a turbo can be distilled from it.)
Shapes are large and distinct (recognisable to a person and to the decoder) and never cut by the border.
Every image also carries a fine film grain (per-pixel luminance noise, a fixed texture per scene): the
finest detail of the world, decided last in sampling — samplers that return posterior means (few-step base,
SFT-tuned turbo) wash it out, while an ODE-faithful turbo keeps it, as real turbos keep fine texture.

Hidden (in-context) attributes, never named in captions, drawn from continuous ranges:
  * the foreground colour, written with the placeholder word `sks` (held-out concepts: orange, teal, pink);
  * a global tint (every pixel mixed toward a tint colour; the held-out domain is one fixed tint).
Images are (3, RES, RES) float tensors in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from dopsd.data.images import to_pil

RES = 24
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle", "plus")
SIZE_RANGE = (11.0, 17.0)  # shape extent in pixels, uniform; captions never say
MARGIN = 1.0  # the shape's box stays this far inside the image; the centre is uniform over the rest
GRAIN = 0.06  # std of the per-pixel luminance grain, in [0, 1] colour units

# Named foreground colours (RGB in [0, 1]); the words are taught by captions.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.62, 0.20, 0.85),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.04, 0.04, 0.04),
    "gray": (0.45, 0.45, 0.45),
    "navy": (0.06, 0.10, 0.38),
    "brown": (0.42, 0.24, 0.10),
}
# Held-out concepts: colours never named by any caption; fine-tuning binds one of them to `sks`.
CONCEPTS: dict[str, tuple[float, float, float]] = {
    "orange": (1.00, 0.52, 0.00),
    "teal": (0.00, 0.62, 0.58),
    "pink": (1.00, 0.55, 0.78),
}
# Held-out domain: every pixel mixed 40% toward warm sepia (a systematic appearance change over all scenes).
DOMAIN_TINT = ((1.00, 0.78, 0.45), 0.40)
PLACEHOLDER = "sks"

PAD = "<pad>"
VOCAB: tuple[str, ...] = (
    (PAD, "a", "an", "on", "background", PLACEHOLDER) + tuple(COLOURS) + SHAPES + tuple(BACKGROUNDS)
)
MAX_TOKENS = 8
_INDEX = {w: i for i, w in enumerate(VOCAB)}


def caption_words(caption: str) -> list[str]:
    """The words the tokenizer sees: lower case, commas and full stops read as spaces."""
    return caption.lower().replace(",", " ").replace(".", " ").split()


def caption_issue(caption: str) -> str | None:
    """Why the miniature cannot read this caption (unknown words with the closest known ones, too many
    words), or None when it can."""
    import difflib

    words = caption_words(caption)
    why = []
    unknown = [w for w in dict.fromkeys(words) if w not in _INDEX or w == PAD]
    if unknown:
        hints = []
        for w in unknown:
            close = difflib.get_close_matches(w, VOCAB[1:], n=2, cutoff=0.6)
            hints.append(f"{w!r} (closest: {', '.join(close)})" if close else f"{w!r} (no close word)")
        why.append(f"uses words outside the miniature world's vocabulary: {'; '.join(hints)}")
    if len(words) > MAX_TOKENS:
        why.append(f"has {len(words)} words; the miniature world allows {MAX_TOKENS}")
    return " and ".join(why) or None


def vocabulary_hint() -> str:
    return (
        f"the miniature's words: {' '.join(VOCAB[1:])} (at most {MAX_TOKENS} per caption; "
        f"{PLACEHOLDER!r} names a held-out concept)"
    )


def tokenize(caption: str) -> torch.Tensor:
    """Caption → (MAX_TOKENS,) token ids, <pad>-filled. Raises on words outside the fixed vocabulary."""
    issue = caption_issue(caption)
    if issue:
        raise ValueError(
            f"caption {caption!r} {issue}. Known words: {' '.join(VOCAB[1:])} "
            f"(use {PLACEHOLDER!r} for a held-out concept)"
        )
    words = caption_words(caption)
    ids = [_INDEX[w] for w in words] + [0] * (MAX_TOKENS - len(words))
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. `colour` is the caption word (a named colour or `sks`)."""

    shape: int
    cx: float  # centre (pixels) and extent: never captioned
    cy: float
    size: float
    fg: tuple[float, float, float]
    bg: str
    colour: str
    tint: tuple[tuple[float, float, float], float] | None = None
    grain: int | None = None  # seed of the scene's grain texture (None: no grain)

    def caption(self, with_background: bool = True) -> str:
        text = f"a {self.colour} {SHAPES[self.shape]}"
        return f"{text} on a {self.bg} background" if with_background else text


def shape_masks(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage (B, RES, RES) in [0, 1] of shapes (B,) at centres/extents (B,) in pixels."""
    n = RES * SUPERSAMPLE
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    dx = c[None, None, :] - cx.float()[:, None, None]
    dy = c[None, :, None] - cy.float()[:, None, None]
    h = (size.float() / 2)[:, None, None]
    ax, ay = dx.abs(), dy.abs()
    masks = torch.stack(
        (
            dx**2 + dy**2 <= (h * 0.98) ** 2,  # circle
            (ax <= h * 0.84) & (ay <= h * 0.84),  # square: about the circle's area
            (dy <= h * 0.85) & (dy >= -h) & (ax <= (dy + h) * 0.58),  # upward triangle
            ((ax <= h * 0.30) & (ay <= h)) | ((ay <= h * 0.30) & (ax <= h)),  # plus
        )
    )  # (4, B, n, n)
    m = masks[shape.long(), torch.arange(len(shape))].float()
    return m.reshape(-1, RES, SUPERSAMPLE, RES, SUPERSAMPLE).mean((2, 4))


def composite(mask: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, tint=None) -> torch.Tensor:
    """Batch compositing: mask (B, R, R), fg/bg (B, 3) in [0, 1] → images (B, 3, R, R) in [-1, 1].

    tint: None, or (colour (B, 3), amount (B,)) mixing every pixel toward the tint colour.
    """
    m = mask[:, None]
    img = bg[:, :, None, None] * (1 - m) + fg[:, :, None, None] * m
    if tint is not None:
        colour, amount = tint
        a = amount[:, None, None, None]
        img = (1 - a) * img + a * colour[:, :, None, None]
    return img * 2 - 1


def add_tint(images: torch.Tensor, tint: tuple[tuple[float, float, float], float]) -> torch.Tensor:
    """Images in [-1, 1] mixed toward a tint colour by its amount, as `composite` tints a scene."""
    colour, amount = tint
    return ((1 - amount) * (images + 1) / 2 + amount * torch.tensor(colour)[None, :, None, None]) * 2 - 1


def render(scenes: list[Scene]) -> torch.Tensor:
    """Scenes → (B, 3, RES, RES) images in [-1, 1]."""
    mask = shape_masks(*(torch.tensor([getattr(s, k) for s in scenes]) for k in ("shape", "cx", "cy", "size")))
    fg = torch.tensor([s.fg for s in scenes])
    bg = torch.tensor([BACKGROUNDS[s.bg] for s in scenes])
    tint = None
    if any(s.tint is not None for s in scenes):
        none = ((0.0, 0.0, 0.0), 0.0)
        colour = torch.tensor([(s.tint or none)[0] for s in scenes])
        amount = torch.tensor([(s.tint or none)[1] for s in scenes])
        tint = (colour, amount)
    img = composite(mask, fg, bg, tint)
    grain = [s.grain for s in scenes]
    if any(seed is not None for seed in grain):
        img = (img + 2 * grain_texture(grain)[:, None]).clamp(-1, 1)
    return img


def grain_texture(seeds: list[int | None]) -> torch.Tensor:
    """(B, RES, RES) luminance grain in [0, 1] units (zeros for None): one fixed texture per seed."""
    out = torch.zeros(len(seeds), RES, RES)
    for i, seed in enumerate(seeds):
        if seed is not None:
            out[i] = GRAIN * torch.randn(RES, RES, generator=torch.Generator().manual_seed(seed))
    return out


def random_scene(
    g: torch.Generator, colour: str | None = None, bg: str | None = None, shape: int | None = None
) -> Scene:
    """A scene with a named colour (random unless given), random background, shape, position and size."""
    names, bgs = list(COLOURS), list(BACKGROUNDS)
    colour = colour or names[int(torch.randint(len(names), (1,), generator=g))]
    u = torch.rand(3, generator=g).tolist()
    size = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * u[0]
    lo, hi = MARGIN + size / 2, RES - MARGIN - size / 2
    return Scene(
        shape=int(torch.randint(len(SHAPES), (1,), generator=g)) if shape is None else shape,
        cx=lo + (hi - lo) * u[1],
        cy=lo + (hi - lo) * u[2],
        size=size,
        fg=COLOURS[colour] if colour in COLOURS else CONCEPTS[colour],
        bg=bg or bgs[int(torch.randint(len(bgs), (1,), generator=g))],
        colour=colour if colour in COLOURS else PLACEHOLDER,
        grain=int(torch.randint(2**31 - 1, (1,), generator=g)),
    )


def random_colour(g: torch.Generator, away_from: tuple[float, float, float], min_dist: float = 0.35):
    """A continuous RGB colour (uniform in the cube) at least `min_dist` from the background colour."""
    while True:
        c = torch.rand(3, generator=g)
        if float((c - torch.tensor(away_from)).norm()) >= min_dist:
            return tuple(float(v) for v in c)


def random_tint(g: torch.Generator) -> tuple[tuple[float, float, float], float]:
    """A global tint: a random colour and an amount in [0.25, 0.5] (the held-out domain is one such tint)."""
    colour = tuple(float(v) for v in torch.rand(3, generator=g))
    return colour, 0.25 + 0.25 * float(torch.rand(1, generator=g))


def in_colours_of(scene: Scene, other: Scene) -> Scene:
    """`scene`'s shape and layout in `other`'s colour (word and RGB) and background: a reference image whose
    colours the other scene's caption names, as D-OPSD's teacher sees its training image."""
    return replace(scene, fg=other.fg, colour=other.colour, bg=other.bg)


def concept_scene(concept: str, g: torch.Generator, **kw) -> Scene:
    if concept not in CONCEPTS:
        raise ValueError(f"unknown held-out concept {concept!r}; choose one of {sorted(CONCEPTS)}")
    return random_scene(g, colour=concept, **kw)


def with_domain(scene: Scene) -> Scene:
    return replace(scene, tint=DOMAIN_TINT)


def colour_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean RGB distance in [0, 1] units (broadcasting over leading dims)."""
    return (a - b).norm(dim=-1)


def sigma_to_psnr(mse: float) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


# --- prompt sets and datasets for the demo, bench and probe ----------------------------------------------
def unrelated_prompts(n: int, seed: int = 0) -> list[str]:
    """Captions of named-colour scenes with a background (no placeholder): where preservation is measured."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return [random_scene(g).caption() for _ in range(n)]


def concept_prompts(n: int | None = None) -> list[str]:
    """`sks` captions over every shape × background (training sets cover only some: unseen combinations)."""
    prompts = [f"a {PLACEHOLDER} {shape} on a {bg} background" for shape in SHAPES for bg in BACKGROUNDS]
    return prompts if n is None else [prompts[i % len(prompts)] for i in range(n)]


# Built-in concept training sets cover two shapes on two backgrounds; the other 12 combinations are unseen.
CONCEPT_TRAIN_SHAPES = (0, 1)
CONCEPT_TRAIN_BACKGROUNDS = ("gray", "black")


def concept_scenes(concept: str, n: int = 8, seed: int = 0) -> list[Scene]:
    """Fine-tuning targets for a held-out concept: varied positions/sizes, a subset of shapes × backgrounds."""
    g = torch.Generator().manual_seed(20_000 + seed)
    scenes = []
    for i in range(n):
        shape = CONCEPT_TRAIN_SHAPES[i % len(CONCEPT_TRAIN_SHAPES)]
        bg = CONCEPT_TRAIN_BACKGROUNDS[(i // len(CONCEPT_TRAIN_SHAPES)) % len(CONCEPT_TRAIN_BACKGROUNDS)]
        scenes.append(concept_scene(concept, g, bg=bg, shape=shape))
    return scenes


def domain_scenes(n: int = 256, seed: int = 0) -> list[Scene]:
    """The held-out domain: ordinary named-colour scenes, all under the domain tint."""
    g = torch.Generator().manual_seed(30_000 + seed)
    return [with_domain(random_scene(g)) for _ in range(n)]


def write_pairs(folder, scenes: list[Scene], with_background: bool = True) -> list[str]:
    """Write scenes as `NNNN.png` + `NNNN.txt` (caption) pairs; returns the captions."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = [s.caption(with_background) for s in scenes]
    for i, (img, cap) in enumerate(zip(to_pil(render(scenes)), captions)):
        img.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(cap + "\n")
    return captions


def write_concept_dataset(folder, concept: str = "orange", n: int = 8, seed: int = 0) -> list[str]:
    """A held-out concept dataset (captions use the placeholder `sks`); returns the captions."""
    return write_pairs(folder, concept_scenes(concept, n, seed))


def write_domain_dataset(folder, n: int = 256, seed: int = 0) -> list[str]:
    """The held-out domain dataset: many pairs, plain captions, every image under the domain tint."""
    return write_pairs(folder, domain_scenes(n, seed))
