"""How ComfyUI applies a LoRA file to Z-Image / FLUX.2, read independently of dopsd's exporter.

Facts from ComfyUI's loader (comfy/lora.py `model_lora_keys_unet` + `load_lora`, comfy/utils.py
`flux_to_diffusers` / `z_image_to_diffusers`, comfy/weight_adapter/lora.py), restated here:
  * the model's own weights are in the original layout (FLUX.2: BFL names with fused `{img,txt}_attn.qkv`;
    Z-Image: fused `attention.qkv`, `attention.out`), prefixed `diffusion_model.`;
  * a LoRA module name `diffusion_model.<original name>` maps onto that weight for every model;
  * FLUX.2 (a Flux model): `transformer.<diffusers name>` and the bare diffusers name map through the Flux table,
    q/k/v onto row slices of the fused qkv; Z-Image (a Lumina2 model): `diffusion_model.`, `transformer.` and bare
    diffusers names map through its table, to_q/to_k/to_v onto row slices of `attention.qkv`;
  * up/down are `lora_B`/`lora_A` (or `lora_up`/`lora_down`); the delta is up @ down × (alpha / rank if a
    `.alpha` key exists, else 1), rank = rows of down; keys no map entry claims are logged and not loaded.
The original-layout weights are built from the diffusers model with the table below and checked against
diffusers' own original→diffusers converters, so the view of the model is diffusers', not dopsd's.
"""

from __future__ import annotations

import re

import torch

QKV = {"to_q": 0, "to_k": 1, "to_v": 2, "add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}
FLUX2_TABLE = {  # diffusers name inside a block → original name
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}


def original_target(family: str, name: str, width: int) -> tuple[str, int | None, int | None] | None:
    """(original module, first row, rows) a diffusers module maps onto in ComfyUI; None if not mapped."""
    if family == "flux2":
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.(\w+)", name)
        if m and m.group(2) in QKV:
            side = "txt" if m.group(2).startswith("add_") else "img"
            return f"double_blocks.{m.group(1)}.{side}_attn.qkv", QKV[m.group(2)] * width, width
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
        if m and m.group(2) in FLUX2_TABLE:
            return f"double_blocks.{m.group(1)}.{FLUX2_TABLE[m.group(2)]}", None, None
        m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.attn\.(to_qkv_mlp_proj|to_out)", name)
        if m:
            return (
                f"single_blocks.{m.group(1)}.{'linear1' if m.group(2) == 'to_qkv_mlp_proj' else 'linear2'}",
                None,
                None,
            )
        return None
    m = re.fullmatch(r"((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)", name)
    if not m:
        return None
    block, rest = m.groups()
    if rest.startswith("attention.") and rest.split(".")[1] in ("to_q", "to_k", "to_v"):
        return f"{block}.attention.qkv", QKV[rest.split(".")[1]] * width, width
    if rest == "attention.to_out.0":
        return f"{block}.attention.out", None, None
    if rest in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"):
        return name, None, None
    return None


def original_weights(family: str, transformer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(original-layout weights of the mapped Linear layers, ComfyUI's key map) of a diffusers transformer
    (without LoRA). Checked: diffusers' converter turns these weights back into the transformer's own."""
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers,
        convert_z_image_transformer_checkpoint_to_diffusers,
    )

    width = transformer.inner_dim if family == "flux2" else transformer.config.dim
    own = {k.removesuffix(".weight"): v for k, v in transformer.state_dict().items() if k.endswith(".weight")}
    weights: dict[str, list] = {}
    key_map: dict[str, tuple[str, int | None, int | None]] = {}
    for name, w in own.items():
        target = original_target(family, name, width)
        if target is None or w.dim() != 2:
            continue
        orig, row, rows = target
        weights.setdefault(orig, []).append((row or 0, w))
        prefixes = ("transformer.", "") if family == "flux2" else ("diffusion_model.", "transformer.", "")
        for p in prefixes:
            key_map[p + name] = target
    native = {k: torch.cat([w for _, w in sorted(parts, key=lambda p: p[0])]) for k, parts in weights.items()}
    for k in native:
        key_map[f"diffusion_model.{k}"] = (k, None, None)
    convert = (
        convert_flux2_transformer_checkpoint_to_diffusers
        if family == "flux2"
        else convert_z_image_transformer_checkpoint_to_diffusers
    )
    back = convert({f"{k}.weight": v.clone() for k, v in native.items()})
    assert set(back) <= {f"{k}.weight" for k in own} and all(
        torch.equal(v, own[k.removesuffix(".weight")]) for k, v in back.items()
    )
    return native, key_map


def comfy_apply(
    lora: dict[str, torch.Tensor], native: dict[str, torch.Tensor], key_map: dict
) -> tuple[dict, list[str]]:
    """(patched original-layout weights, LoRA keys ComfyUI would leave unloaded)."""
    patched = {k: v.clone().float() for k, v in native.items()}
    loaded = set()
    for x, (target, row, rows) in key_map.items():
        for up_s, down_s in ((".lora_B.weight", ".lora_A.weight"), (".lora_up.weight", ".lora_down.weight")):
            if x + up_s in lora:
                up, down = lora[x + up_s].float(), lora[x + down_s].float()
                alpha = lora.get(x + ".alpha")
                scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                delta = scale * (up @ down)
                w = patched[target]
                if row is None:
                    w += delta
                else:
                    w[row : row + rows] += delta
                loaded |= {x + up_s, x + down_s} | ({x + ".alpha"} if alpha is not None else set())
                break
    return patched, sorted(set(lora) - loaded)


def to_diffusers(family: str, patched: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers,
        convert_z_image_transformer_checkpoint_to_diffusers,
    )

    convert = (
        convert_flux2_transformer_checkpoint_to_diffusers
        if family == "flux2"
        else convert_z_image_transformer_checkpoint_to_diffusers
    )
    return convert({f"{k}.weight": v for k, v in patched.items()})
