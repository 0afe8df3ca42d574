"""The dataset check's findings beyond single files: captions (placeholder, trigger, the model family's own
caption check) and one summary of what training will do to the images (resize, crop, transparency, …).

Problems (the data cannot be used as it is) go to the DatasetError the loader raises; notes (it is used, but
changed) become the report `dopsd train` and `dopsd probe` print once before they start. Every note is one
bullet about all files it concerns, never a line per file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from dopsd.data.image_files import ImageFacts, detail_lost, fit_plan
from dopsd.errors import PromptError
from dopsd.models.registry import caption_problems

TINY_SIDE = 64  # at or below this training side, the finest detail is per pixel (the miniature: 24)
CROP_SHOWN = 0.01  # crops under 1% of the picture are rounding, not worth a word


@dataclass
class Caption:
    text: str  # as written in the file (before the trigger word is applied)
    where: str  # "cat.txt line 2" or "metadata.jsonl line 7 (cat.png)"


def names(items: list[str], shown: int = 5) -> str:
    """'a, b, c and 4 more' — notes name files without becoming a line per file."""
    head = ", ".join(items[:shown])
    return head if len(items) <= shown else f"{head} and {len(items) - shown} more"


def normalized_trigger(trigger: str | None) -> str | None:
    """The trigger word with surrounding and repeated whitespace removed (None when unset or blank)."""
    return " ".join(trigger.split()) or None if trigger else None


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words (punctuation around it allowed: 'ohwx, a dog')."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in phrase.split()) + r"(?!\w)"
    return re.search(pattern, text) is not None


def check_captions(
    captions: list[Caption], applied: list[str], data: Any, model: Any, problems: list[str], notes: list[str]
) -> list[str]:
    """Placeholder/trigger rules and the family's caption check (dopsd.models.registry.caption_problems) over
    every caption at once. `applied[i]` is captions[i] with the trigger word applied. Returns hint lines that
    go after the problems (e.g. the words the miniature knows)."""
    trigger = normalized_trigger(data.trigger_word)
    if data.trigger_word is not None and data.trigger_word != "" and trigger is None:
        problems.append(f"data.trigger_word is blank ({data.trigger_word!r}): set a word, or null for none")
    if data.placeholder and trigger is None:
        literal = [c.where for c in captions if data.placeholder in c.text]
        if literal:
            notes.append(
                f"{len(literal)} caption(s) use the placeholder {data.placeholder!r} as a word of their own, since "
                f"data.trigger_word is not set ({names(literal)}): prompt with {data.placeholder!r} too, or set "
                "data.trigger_word to the word that should replace it"
            )
    word = trigger or data.placeholder
    alone = [c.where for c, text in zip(captions, applied) if word and text == word]
    if alone:
        notes.append(
            f"{len(alone)} caption(s) are only the concept's word {word!r} ({names(alone)}): it is bound to "
            "everything in those images; describing the rest (setting, pose, style) helps it bind to the concept"
        )
    distinct = list(dict.fromkeys(applied))
    where: dict[str, list[str]] = {}
    for c, text in zip(captions, applied):
        where.setdefault(text, []).append(c.where)
    found = caption_problems(model, distinct)
    hints, cut = [], []
    for p in found:
        if p.index is None:  # general lines: hints follow the problems; notice hints join the notice below
            if not p.notice:
                hints.append(p.message)
            continue
        text = distinct[p.index]
        line = f'"{text}" ({names(where[text], 10)}): {p.message}'
        (cut if p.notice else problems).append(line)
    if cut:
        general = [p.message for p in found if p.index is None and p.notice]
        notes.append(f"{len(cut)} distinct caption(s) will not be read whole:\n" + "\n".join(cut + general))
    return hints


def image_notes(items: list[tuple[str, ImageFacts, tuple[int, int]]], height: int, width: int) -> list[str]:
    """What loading does to the images: (name, facts, training (h, w)) per example."""
    notes: list[str] = []
    down, up, crops = [], [], []
    for name, facts, bucket in items:
        scale, cut = fit_plan(facts.size, bucket)
        if scale < 1 - 1e-6:
            down.append((name, facts.size, bucket, 1 / scale))
        elif scale > 1 + 1e-6:
            up.append((name, facts.size, bucket, scale))
        if cut >= CROP_SHOWN:
            crops.append((name, facts.size, cut))

    def wh(size: tuple[int, int]) -> str:
        return f"{size[0]}×{size[1]}"

    def target(group: list[tuple[Any, ...]]) -> str:
        buckets = sorted({b for _, _, b, _ in group})
        if len(buckets) == 1:
            return f"{buckets[0][1]}×{buckets[0][0]}"
        return f"their buckets ({', '.join(f'{b[1]}×{b[0]}' for b in buckets[:4])}{' …' if len(buckets) > 4 else ''})"

    by_area = lambda g: sorted(g, key=lambda x: x[1][0] * x[1][1])  # noqa: E731
    if down:
        g = by_area(down)
        span = wh(g[0][1]) if g[0][1] == g[-1][1] else f"{wh(g[0][1])} … {wh(g[-1][1])}"
        notes.append(
            f"{len(down)} of {len(items)} images are downscaled to {target(down)}: from {span} "
            f"(up to {max(f for *_, f in down):.1f}× smaller per side)"
        )
        largest = max(f for *_, f in down)
        if min(height, width) <= TINY_SIDE and largest >= 1.5:
            factor = int(min(16, max(2, round(largest))))
            lost = detail_lost(height, width, factor)
            notes.append(
                f"the training size {width}×{height} is tiny: downscaling to it smooths away the finest, per-pixel "
                f"detail — a per-pixel texture like the miniature's film grain loses {lost:.0%} of its variance when "
                f"a {factor}× larger copy is brought back to {width}×{height} this way (measured now); give images "
                f"at exactly {width}×{height} to keep it"
            )
    if up:
        g = by_area(up)
        notes.append(
            f"{len(up)} of {len(items)} images are upscaled to {target(up)}: from {wh(g[0][1])} "
            f"(up to {max(f for *_, f in up):.1f}× larger per side); upscaled images are soft and the model "
            "learns the softness: give images at least the training size"
        )
    if crops:
        worst = max(crops, key=lambda c: c[2])
        mean = sum(c[2] for c in crops) / len(crops)
        notes.append(
            f"{len(crops)} of {len(items)} images are centre-cropped to the training shape: {mean:.0%} of the picture "
            f"cut off on average, up to {worst[2]:.0%} ({worst[0]}, {wh(worst[1])}); wide images lose their left and "
            "right edges, tall ones their top and bottom — crop them yourself to keep what matters in the frame"
        )
    facts = [(n, f) for n, f, _ in items]
    groups = (
        (
            [n for n, f in facts if f.transparent],
            "have transparent pixels, flattened onto white",
            "; save them with the background you want trained on",
        ),
        (
            [n for n, f in facts if f.rotated],
            "are turned upright as their EXIF orientation tag says (as viewers show them)",
            "",
        ),
        (
            [f"{n} ({f.depth})" for n, f in facts if f.depth],
            "have more than 8 bits per channel and are read as 8-bit",
            "",
        ),
        ([f"{n} ({f.profile})" for n, f in facts if f.profile], "carry a colour profile other than sRGB", ""),
        (
            [n for n, f in facts if f.naive_cmyk],
            "are CMYK without a colour profile, converted with the simple formula",
            "; colours may be off: save them as RGB",
        ),
    )
    for hits, what, advice in groups:
        if hits:
            notes.append(f"{len(hits)} image(s) {what}: {names(hits)}{advice}")
    return notes


def format_counts(facts: list[ImageFacts]) -> str:
    counts = Counter(f.format for f in facts)
    return ", ".join(f"{n} {fmt}" for fmt, n in counts.most_common())


def check_prompts(cfg: Any) -> None:
    """The prompts a run samples or preserves (sample.prompts, method.prior_prompts), read by the family's caption
    check before any work: PromptError naming each key, index and prompt that the model cannot read."""
    lines, hints = [], []
    for key, prompts in (("sample.prompts", cfg.sample.prompts), ("method.prior_prompts", cfg.method.prior_prompts)):
        prompts = list(prompts or [])
        for p in caption_problems(cfg.model, prompts):
            if p.index is None:
                if not p.notice and p.message not in hints:
                    hints.append(p.message)
            elif not p.notice:
                lines.append(f'{key}[{p.index}] "{prompts[p.index]}": {p.message}')
    if lines:
        raise PromptError("prompts the model cannot read:\n  " + "\n  ".join(lines + hints))
