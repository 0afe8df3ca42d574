"""LoRA key layouts: dopsd's peft modules (diffusers module names) ↔ the layout other tools load.

The interchange layout is one set of keys that both diffusers (`pipe.load_lora_weights`) and ComfyUI read with
the same result:
  * keys `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight`, no `.alpha` keys: the LoRA scale α/r is
    folded into lora_B, so every loader applies the file at strength 1 as trained (ComfyUI uses scale 1 without an
    `.alpha` key; diffusers' FLUX.2 converter rejects `.alpha` keys in this layout);
  * Z-Image: diffusers module names (ComfyUI's Z-Image key map accepts them and slices to_q/to_k/to_v into its
    fused qkv; diffusers strips the prefix);
  * FLUX.2: the original (BFL) module names, which ComfyUI matches directly and diffusers converts: q/k/v of a
    double block are fused exactly into `{img,txt}_attn.qkv` (A stacked, B block-diagonal).

The family-specific part is data (`LAYOUTS`: one row per module kind); `to_interchange` / `from_interchange` are
the one generic routine each way.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from dopsd.errors import WeightsFileError

PREFIX = "diffusion_model."
QKV = 3  # parts of a fused q/k/v projection

# (diffusers module, module in the interchange layout, slot in a fused q/k/v or None). `{i}` is a block index,
# `{blk}` a Z-Image block list. Only modules both ComfyUI and diffusers map are listed; rows are tried in order.
FLUX2_LAYOUT: tuple[tuple[str, str, int | None], ...] = (
    ("transformer_blocks.{i}.attn.to_q", "double_blocks.{i}.img_attn.qkv", 0),
    ("transformer_blocks.{i}.attn.to_k", "double_blocks.{i}.img_attn.qkv", 1),
    ("transformer_blocks.{i}.attn.to_v", "double_blocks.{i}.img_attn.qkv", 2),
    ("transformer_blocks.{i}.attn.add_q_proj", "double_blocks.{i}.txt_attn.qkv", 0),
    ("transformer_blocks.{i}.attn.add_k_proj", "double_blocks.{i}.txt_attn.qkv", 1),
    ("transformer_blocks.{i}.attn.add_v_proj", "double_blocks.{i}.txt_attn.qkv", 2),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj", None),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj", None),
    ("transformer_blocks.{i}.ff.linear_in", "double_blocks.{i}.img_mlp.0", None),
    ("transformer_blocks.{i}.ff.linear_out", "double_blocks.{i}.img_mlp.2", None),
    ("transformer_blocks.{i}.ff_context.linear_in", "double_blocks.{i}.txt_mlp.0", None),
    ("transformer_blocks.{i}.ff_context.linear_out", "double_blocks.{i}.txt_mlp.2", None),
    ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj", "single_blocks.{i}.linear1", None),
    ("single_transformer_blocks.{i}.attn.to_out", "single_blocks.{i}.linear2", None),
    ("x_embedder", "img_in", None),
    ("context_embedder", "txt_in", None),
    ("proj_out", "final_layer.linear", None),
    ("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer", None),
    ("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer", None),
    ("time_guidance_embed.guidance_embedder.linear_1", "guidance_in.in_layer", None),
    ("time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer", None),
    ("double_stream_modulation_img.linear", "double_stream_modulation_img.lin", None),
    ("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin", None),
    ("single_stream_modulation.linear", "single_stream_modulation.lin", None),
)
ZIMAGE_LAYOUT: tuple[tuple[str, str, int | None], ...] = tuple((name, name, None) for name in (
    "{blk}.{i}.attention.to_q", "{blk}.{i}.attention.to_k", "{blk}.{i}.attention.to_v", "{blk}.{i}.attention.to_out.0",
    "{blk}.{i}.feed_forward.w1", "{blk}.{i}.feed_forward.w2", "{blk}.{i}.feed_forward.w3",
    "{blk}.{i}.adaLN_modulation.0", "all_x_embedder.2-1", "all_final_layer.2-1.linear",
    "all_final_layer.2-1.adaLN_modulation.1", "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2",
))
LAYOUTS = {"zimage": ZIMAGE_LAYOUT, "flux2": FLUX2_LAYOUT}

# Module names that tell the family of a set of LoRA keys (any layout).
_FAMILY_SIGNS = (
    ("flux2", re.compile(r"(^|\.)(single_)?transformer_blocks\.\d+\.|(^|\.)(double|single)_blocks\.\d+\.")),
    ("zimage", re.compile(r"(^|\.)(layers|noise_refiner|context_refiner)\.\d+\.")),
)
_KEY = re.compile(r"(?P<prefix>transformer\.|diffusion_model\.|base_model\.model\.)?(?P<module>.+?)"
                  r"\.(?:(?:lora_(?P<ab>[AB])(?:\.default)?\.weight)|(?:lora_(?P<du>down|up)\.weight)|(?P<alpha>alpha))")


class LoraFileError(WeightsFileError, ValueError):
    """A LoRA file that cannot be read, converted or written as asked; the message names the file and the fix."""


Pair = tuple[torch.Tensor, torch.Tensor]  # (lora_A: r × in, lora_B: out × r)


_PLACEHOLDERS = {"i": r"\d+", "blk": "layers|noise_refiner|context_refiner"}


def _regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, value in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{value})")
    return re.compile(pattern)


@lru_cache(maxsize=None)
def _rules(family: str) -> tuple[tuple[re.Pattern[str], str, re.Pattern[str], str, int | None], ...]:
    if family not in LAYOUTS:
        raise LoraFileError(f"no LoRA layout for model family {family!r}; other tools load only "
                            f"{', '.join(LAYOUTS)} LoRAs")
    return tuple((_regex(d), d, _regex(n), n, slot) for d, n, slot in LAYOUTS[family])


def native_name(family: str, module: str) -> tuple[str, int | None]:
    """Interchange-layout name of a diffusers module and, for q/k/v, its slot in the fused projection."""
    for d_re, _, _, n_tpl, slot in _rules(family):
        m = d_re.fullmatch(module)
        if m:
            return n_tpl.format(**m.groupdict()), slot
    raise LoraFileError(f"{family} module {module!r} has no name that ComfyUI and diffusers both load; "
                        "drop it from lora.targets")


def check_exportable(family: str, modules: list[str]) -> None:
    """Raise LoraFileError (naming the module) unless every module has an interchange name: call it once the
    LoRA is injected, before training, so a run never ends with weights other tools cannot load."""
    for module in modules:
        native_name(family, module)


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
    for family, sign in _FAMILY_SIGNS:
        if any(sign.search(n) for n in names):
            return family
    return None


def split_keys(state: dict[str, torch.Tensor], where: str = "the LoRA file") -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """(key prefix, {module: {"A", "B"[, "alpha"]}}) of LoRA weights in any of the usual spellings."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    prefixes = set()
    for key, value in state.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise LoraFileError(f"{where}: key {key!r} is not a LoRA weight (lora_A/lora_B/alpha); "
                                "pass a LoRA file, not a model")
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
            a[s * rank:(s + 1) * rank] = pa
            b[s * out_dim:(s + 1) * out_dim, s * rank:(s + 1) * rank] = pb
        out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = a, b
    return out


def _split_fused(a: torch.Tensor, b: torch.Tensor) -> list[Pair]:
    """q, k, v of a fused LoRA: exact rank-r parts if B is block-diagonal (dopsd's own files), else the exact
    shared-A form every fused LoRA has (each part rank 3r), as diffusers splits them."""
    out_dim = b.shape[0] // QKV
    if a.shape[0] % QKV == 0:
        r = a.shape[0] // QKV
        blocks = [(a[s * r:(s + 1) * r], b[s * out_dim:(s + 1) * out_dim]) for s in range(QKV)]
        if all(torch.count_nonzero(pb[:, :s * r]) == 0 and torch.count_nonzero(pb[:, (s + 1) * r:]) == 0
               for s, (_, pb) in enumerate(blocks)):
            return [(pa, pb[:, s * r:(s + 1) * r]) for s, (pa, pb) in enumerate(blocks)]
    return [(a, b[s * out_dim:(s + 1) * out_dim]) for s in range(QKV)]


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
            raise LoraFileError(f"{PREFIX}{native}: a fused LoRA of shape {tuple(b.shape)} that does not split into q/k/v")
    return modules
