"""LoRA key layouts: dopsd's peft modules (diffusers module names) ↔ the layout other tools load.

The interchange layout is one set of keys that both diffusers (`pipe.load_lora_weights`) and ComfyUI read with
the same result:
  * keys `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight`, no `.alpha` keys: the LoRA scale α/r is
    folded into lora_B, so every loader applies the file at strength 1 as trained (ComfyUI uses scale 1 without an
    `.alpha` key; diffusers' FLUX.2 converter rejects `.alpha` keys in this layout);
  * module names as each family's layout rows say (dopsd.models.base.LoraLayout, defined in the family's module):
    one row per module kind, with the slot of a q/k/v projection that the interchange layout fuses (A stacked, B
    block-diagonal, so it splits back exactly).

This module knows no family: `to_interchange` / `from_interchange` are the one generic routine each way, and the
rows come from the family through dopsd.models.registry.
"""

from __future__ import annotations

import re
from functools import cache

import torch

from dopsd.errors import WeightsFileError
from dopsd.models.base import Pair
from dopsd.models.registry import family_of_lora, interchange_families, lora_layout

PREFIX = "diffusion_model."
QKV = 3  # parts of a fused q/k/v projection

_KEY = re.compile(
    r"(?P<prefix>transformer\.|diffusion_model\.|base_model\.model\.)?(?P<module>.+?)"
    r"\.(?:(?:lora_(?P<ab>[AB])(?:\.default)?\.weight)|(?:lora_(?P<du>down|up)\.weight)|(?P<alpha>alpha))"
)


class LoraFileError(WeightsFileError, ValueError):
    """A LoRA file that cannot be read, converted or written as asked; the message names the file and the fix."""


@cache
def _rules(family: str) -> tuple[tuple[re.Pattern[str], str, re.Pattern[str], str, int | None], ...]:
    try:
        layout = lora_layout(family)
    except ValueError:  # not a family at all
        layout = None
    if layout is None:
        raise LoraFileError(
            f"no LoRA layout for model family {family!r}; other tools load only "
            f"{', '.join(interchange_families())} LoRAs"
        )
    return tuple((layout.pattern(d), d, layout.pattern(n), n, slot) for d, n, slot in layout.rows)


def has_interchange(family: str) -> bool:
    """Whether other tools load this family's LoRAs (it has an interchange layout); False for unknown families."""
    try:
        return lora_layout(family) is not None
    except ValueError:
        return False


def native_name(family: str, module: str) -> tuple[str, int | None]:
    """Interchange-layout name of a diffusers module and, for q/k/v, its slot in the fused projection."""
    for d_re, _, _, n_tpl, slot in _rules(family):
        m = d_re.fullmatch(module)
        if m:
            return n_tpl.format(**m.groupdict()), slot
    raise LoraFileError(
        f"{family} module {module!r} has no name that ComfyUI and diffusers both load; drop it from lora.targets"
    )


def unexportable(family: str, modules: list[str]) -> list[str]:
    """The modules (of a family with an interchange layout) that have no interchange name."""
    rules = _rules(family)
    return [m for m in modules if not any(d_re.fullmatch(m) for d_re, *_ in rules)]


def diffusers_names(family: str, native: str) -> dict[int | None, str]:
    """{slot: diffusers module} of an interchange-layout module (slots 0, 1, 2 for a fused q/k/v)."""
    found = {}
    for _, d_tpl, n_re, _, slot in _rules(family):
        m = n_re.fullmatch(native)
        if m and slot not in found:
            found[slot] = d_tpl.format(**m.groupdict())
    if not found:
        raise LoraFileError(f"{PREFIX}{native}: not a {family} module that dopsd knows")
    return found


def family_of_names(names: list[str]) -> str | None:
    """The family whose LoRA module names these are (dopsd.models.registry.family_of_lora)."""
    return family_of_lora(names)


def split_keys(
    state: dict[str, torch.Tensor], where: str = "the LoRA file"
) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """(key prefix, {module: {"A", "B"[, "alpha"]}}) of LoRA weights in any of the usual spellings."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    prefixes = set()
    for key, value in state.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise LoraFileError(
                f"{where}: key {key!r} is not a LoRA weight (lora_A/lora_B/alpha); pass a LoRA file, not a model"
            )
        part = "alpha" if m["alpha"] else (m["ab"] or {"down": "A", "up": "B"}[m["du"]])
        modules.setdefault(m["module"], {})[part] = value
        prefixes.add(m["prefix"] or "")
    if len(prefixes) > 1:
        raise LoraFileError(f"{where} mixes key prefixes {sorted(prefixes)}; it is not one LoRA")
    for name, parts in modules.items():
        if not {"A", "B"} <= set(parts):
            raise LoraFileError(f"{where}: LoRA module {name} lacks lora_{'A' if 'A' not in parts else 'B'}")
    return (prefixes.pop() if prefixes else ""), modules


def to_interchange(modules: dict[str, Pair], family: str) -> dict[str, torch.Tensor]:
    """Interchange-layout tensors of diffusers-named modules whose lora_B already carries the LoRA scale."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, Pair]] = {}
    for module, (a, b) in modules.items():
        name, slot = native_name(family, module)
        if slot is None:
            out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = a, b
        else:
            fused.setdefault(name, {})[slot] = (a, b)
    for name, parts in fused.items():
        # Exact fusion: A stacked over q, k, v; B block-diagonal. A part that was not trained gets zero blocks
        # (its delta stays zero), so every fused projection has 3 equal parts and splits back exactly.
        a0, b0 = next(iter(parts.values()))
        rank, out_dim = a0.shape[0], b0.shape[0]
        a = a0.new_zeros(QKV * rank, a0.shape[1])
        b = b0.new_zeros(QKV * out_dim, QKV * rank)
        for s, (pa, pb) in parts.items():
            if pa.shape[0] != rank or pb.shape[0] != out_dim:
                raise LoraFileError(f"q/k/v LoRAs of {name} differ in rank or width; train them with one rank")
            a[s * rank : (s + 1) * rank] = pa
            b[s * out_dim : (s + 1) * out_dim, s * rank : (s + 1) * rank] = pb
        out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = a, b
    return out


def _split_fused(a: torch.Tensor, b: torch.Tensor) -> list[Pair]:
    """q, k, v of a fused LoRA: exact rank-r parts if B is block-diagonal (dopsd's own files), else the exact
    shared-A form every fused LoRA has (each part rank 3r), as diffusers splits them."""
    out_dim = b.shape[0] // QKV
    if a.shape[0] % QKV == 0:
        r = a.shape[0] // QKV
        blocks = [(a[s * r : (s + 1) * r], b[s * out_dim : (s + 1) * out_dim]) for s in range(QKV)]
        if all(
            torch.count_nonzero(pb[:, : s * r]) == 0 and torch.count_nonzero(pb[:, (s + 1) * r :]) == 0
            for s, (_, pb) in enumerate(blocks)
        ):
            return [(pa, pb[:, s * r : (s + 1) * r]) for s, (pa, pb) in enumerate(blocks)]
    return [(a, b[s * out_dim : (s + 1) * out_dim]) for s in range(QKV)]


def from_interchange(parts: dict[str, dict[str, torch.Tensor]], family: str) -> dict[str, Pair]:
    """Diffusers-named modules (scale folded into lora_B) from `split_keys` output of an interchange-layout file;
    `.alpha` keys other tools write are folded in as alpha / rank."""
    modules: dict[str, Pair] = {}
    for native, p in parts.items():
        a, b = p["A"], p["B"]
        if "alpha" in p:
            b = b * (float(p["alpha"]) / a.shape[0])
        names = diffusers_names(family, native)
        if None in names:
            modules[names[None]] = (a, b)
        elif sorted(names) == list(range(QKV)) and b.shape[0] % QKV == 0:
            for slot, pair in enumerate(_split_fused(a, b)):
                modules[names[slot]] = pair
        else:
            raise LoraFileError(
                f"{PREFIX}{native}: a fused LoRA of shape {tuple(b.shape)} that does not split into q/k/v"
            )
    return modules
