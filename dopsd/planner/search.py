"""Which settings make a run fit a card: the fewest changes, tried in a fixed order of preference.

Changes, most preferred first (each is one config key; within a kind, the milder value first):
gradient checkpointing on, 8-bit AdamW, a quantized frozen base (int8, then nf4; LoRA only), a lower LoRA rank
(32, 16), a lower resolution (768², 512² by area), batch 1 (the rest moved to gradient accumulation).
All sets of one change are tried before any set of two, and so on up to three — first without touching the
resolution or the batch (they change what is trained), then with them. Resident bytes are recounted
for every candidate; activations are measured again only when the candidate changes them (checkpointing,
resolution, batch; the sampling phase: resolution), once per distinct setting. A candidate fits when its
training, feature-caching and sampling peaks all do.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Any

from dopsd.planner.caching import caching_peaks
from dopsd.planner.resident import GiB

MAX_CHANGES = 3
METHODS = ("sft", "dopsd", "dopsd_prior")  # what a plan covers
CARDS = (16, 24, 48, 80)  # GiB
CUDA_CONTEXT = 1.0 * GiB  # not predicted: the CUDA context and allocator reserve, assumed when checking cards


def fits(peak: float, card: int) -> bool:
    return peak + CUDA_CONTEXT <= card * GiB


def _options(planner: Any, c: Any, shape: bool) -> list[list[tuple[str, dict[str, Any]]]]:
    """Kinds of change; each kind lists its alternatives as (config text, Choice fields)."""
    kinds: list[list[tuple[str, dict[str, Any]]]] = []
    if not c.gradient_checkpointing and planner.supports_gc():
        kinds.append([("train.gradient_checkpointing=true", {"gradient_checkpointing": True})])
    if not c.eight_bit:
        kinds.append([("optim.eight_bit=true", {"eight_bit": True})])
    if c.lora_rank is not None:
        levels = {"none": 0, "int8": 1, "float8": 1, "nf4": 2}
        kinds.append(
            [(f"model.quantize={q}", {"quantize": q}) for q in ("int8", "nf4") if levels[q] > levels[c.quantize]]
        )
        kinds.append([(f"lora.rank={r}", {"lora_rank": r}) for r in (32, 16) if r < c.lora_rank])
    else:
        kinds.append([("lora.enabled=true lora.rank=64", {"lora_rank": 64})])
    if not shape:
        return [k for k in kinds if k]
    area = c.height * c.width
    res = []
    for side in (768, 512):
        if side * side < area:
            scale = math.sqrt(side * side / area)
            h, w = max(64, round(c.height * scale / 64) * 64), max(64, round(c.width * scale / 64) * 64)
            res.append((f"model.height={h} model.width={w}", {"height": h, "width": w}))
    kinds.append(res)
    if c.batch > 1:
        kinds.append([(f"train.batch_size=1 train.gradient_accumulation=x{c.batch}", {"batch": 1})])
    return [k for k in kinds if k]


def candidates(planner: Any, c: Any):
    seen = set()
    for shape in (False, True):
        kinds = _options(planner, c, shape)
        for n in range(1, MAX_CHANGES + 1):
            for group in itertools.combinations(range(len(kinds)), n):
                for picks in itertools.product(*(kinds[i] for i in group)):
                    texts = tuple(text for text, _ in picks)
                    if texts in seen:
                        continue
                    seen.add(texts)
                    fields: dict[str, Any] = {}
                    for _, f in picks:
                        fields.update(f)
                    yield list(texts), replace(c, **fields)


def suggestions(planner: Any, c: Any, caching: dict[str, Any]) -> dict[str, Any]:
    """{method: {card: {"changes": [...], "peak_gb": ...} or None}} for cards the configured run does not fit."""
    base = planner.peaks(c)
    sampling = planner.sampling(c)
    cache_cache: dict[str, float] = {}

    def cache_peak(choice: Any, method: str) -> float:
        key = f"{choice.quantize}"
        if key not in cache_cache:
            cache_cache[key] = (
                caching_peaks(planner.spec, choice, planner.target) if choice.quantize != c.quantize else caching
            )
        stages = cache_cache[key]["stages"]
        needed = "latents" if method == "sft" else "teacher"
        return max(s["peak"] for s in stages if s["needed_by"] in ("student", needed))

    out: dict[str, Any] = {}
    for method in METHODS:
        per: dict[str, Any] = {}
        for card in CARDS:
            if fits(max(base[method]["peak"], cache_peak(c, method), sampling[method]), card):
                continue
            found = None
            best_cache = cache_peak(replace(c, quantize="nf4") if c.lora_rank else c, method)
            if not fits(best_cache, card):  # no setting here changes the encoders: nothing to search
                per[str(card)] = {
                    "changes": None,
                    "reason": f"feature caching needs {best_cache / GiB:.1f} GiB (the largest encoder with the VAE)",
                    "caching_peak_gb": best_cache / GiB,
                }
                continue
            for changes, cand in candidates(planner, c):
                train = planner.peaks(cand)[method]["peak"]
                if not fits(max(train, cache_peak(cand, method)), card):
                    continue
                sample = planner.sampling(cand)[method]  # measured last: only for candidates that fit so far
                if fits(sample, card):
                    found = {
                        "changes": changes,
                        "peak_gb": train / GiB,
                        "sampling_peak_gb": sample / GiB,
                        "caching_peak_gb": cache_peak(cand, method) / GiB,
                        "settings": cand.label(),
                    }
                    break
            per[str(card)] = found
        out[method] = per
    return out
