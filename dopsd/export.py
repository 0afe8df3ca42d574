"""`dopsd export`: LoRA files that other tools load.

  * diffusers: `pytorch_lora_weights.safetensors`, keys `transformer.<module>.lora_A/B.weight` and the peft
    config as metadata (`lora_adapter_metadata`): `pipe.load_lora_weights(dir)` restores it exactly.
  * comfyui: keys `diffusion_model.<module>.lora_A/B.weight` with the LoRA scale (alpha/r) folded into
    lora_B (no alpha keys, so every loader applies scale 1). Z-Image keeps diffusers module names (ComfyUI's
    Lumina2/Z-Image loader maps them onto its fused qkv); FLUX.2 uses the original BFL names:
    single blocks `single_blocks.N.linear1/linear2`, double blocks `double_blocks.N.{img,txt}_attn.qkv`
    (q/k/v fused exactly: A stacked, B block-diagonal), `{img,txt}_attn.proj`, `{img,txt}_mlp.{0,2}`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
RUN_LORA, RUN_CONFIG = "lora.safetensors", "lora_config.json"  # what `dopsd train` writes (dopsd.sample)
FAMILIES = ("zimage", "flux2")

# diffusers → BFL names inside FLUX.2 blocks (the inverse of diffusers' single-file converter).
_FLUX2_DOUBLE = {
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
}
_FLUX2_QKV = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
              "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
              "attn.add_v_proj": ("txt_attn.qkv", 2)}
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_FLUX2_GLOBAL = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}


def family_of(network_or_keys: nn.Module | list[str]) -> str:
    """'zimage' or 'flux2' from a transformer or from LoRA key names."""
    if isinstance(network_or_keys, nn.Module):
        names = [type(m).__name__ for m in network_or_keys.modules()]
        if any(n.startswith("ZImageTransformer") for n in names):
            return "zimage"
        if any(n.startswith("Flux2Transformer") for n in names):
            return "flux2"
        raise ValueError(f"cannot export LoRA for {type(network_or_keys).__name__}: only Z-Image and FLUX.2 transformers")
    keys = network_or_keys
    if any("transformer_blocks." in k or "double_blocks." in k or "single_blocks." in k for k in keys):
        return "flux2"
    if any(re.search(r"(^|\.)(layers|noise_refiner|context_refiner)\.\d+\.", k) for k in keys):
        return "zimage"
    raise ValueError("cannot tell the model family from the LoRA keys; pass --model zimage|flux2")


def pipeline_class(family: str):
    from diffusers import Flux2KleinPipeline, ZImagePipeline

    return {"zimage": ZImagePipeline, "flux2": Flux2KleinPipeline}[family]


def save_diffusers(network: nn.Module, out_dir: str | Path, adapter: str = "default") -> Path:
    """Save the network's peft LoRA in diffusers format; returns the .safetensors path."""
    from peft import get_peft_model_state_dict

    config = getattr(network, "peft_config", {}).get(adapter)
    if config is None:
        raise ValueError("the network has no LoRA adapter to export (was it trained with LoRA?)")
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(network, adapter_name=adapter).items()}
    out = Path(out_dir)
    pipeline_class(family_of(network)).save_lora_weights(
        str(out), transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict()
    )
    return out / WEIGHTS_NAME


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensors and peft metadata (without the `transformer.` prefix) of a LoRA file or folder."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = next((p / n for n in (WEIGHTS_NAME, RUN_LORA) if (p / n).is_file()), p / WEIGHTS_NAME)
    if not p.is_file():
        raise FileNotFoundError(f"no LoRA file at {path} (expected a .safetensors file or a folder with "
                                f"{WEIGHTS_NAME} or {RUN_LORA})")
    with safe_open(str(p), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    meta = None
    if raw:
        meta = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in json.loads(raw).items()}
    elif (p.parent / RUN_CONFIG).is_file():  # a dopsd run's LoRA: bare peft keys + lora_config.json beside them
        run = json.loads((p.parent / RUN_CONFIG).read_text())
        if "rank" in run:
            meta = {"r": run["rank"], "lora_alpha": run.get("alpha", run["rank"]), "target_modules": run.get("targets")}
    return state, meta


def _scale(module: str, rank: int, meta: dict[str, Any] | None, alpha: float | None) -> float:
    """LoRA scale alpha/r of one module (peft rank/alpha patterns honoured); without a config, alpha/rank."""
    if meta is None:
        return 1.0 if alpha is None else alpha / rank
    r, a = meta.get("r", rank), meta.get("lora_alpha", meta.get("r", rank))
    for pat, val in (meta.get("rank_pattern") or {}).items():
        if module == pat or module.endswith("." + pat) or re.fullmatch(pat, module):
            r = val
    for pat, val in (meta.get("alpha_pattern") or {}).items():
        if module == pat or module.endswith("." + pat) or re.fullmatch(pat, module):
            a = val
    return a / (r**0.5 if meta.get("use_rslora") else r)


def _split(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"A": lora_A, "B": lora_B}} from any of the prefixes dopsd writes."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(?:transformer\.|diffusion_model\.|base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise ValueError(f"unexpected key {key!r}: not a LoRA A/B weight")
        modules.setdefault(m.group(1), {})[m.group(2)] = value.float()
    for name, ab in modules.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA module {name} lacks lora_{'A' if 'A' not in ab else 'B'}")
    return modules


def _flux2_name(module: str) -> tuple[str, int | None]:
    """BFL name of a diffusers FLUX.2 module and, for q/k/v, its slot in the fused qkv."""
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m:
        i, rest = m.groups()
        if rest in _FLUX2_QKV:
            name, slot = _FLUX2_QKV[rest]
            return f"double_blocks.{i}.{name}", slot
        if rest in _FLUX2_DOUBLE:
            return f"double_blocks.{i}.{_FLUX2_DOUBLE[rest]}", None
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in _FLUX2_SINGLE:
        return f"single_blocks.{m.group(1)}.{_FLUX2_SINGLE[m.group(2)]}", None
    if module in _FLUX2_GLOBAL:
        return _FLUX2_GLOBAL[module], None
    raise ValueError(f"FLUX.2 module {module!r} has no ComfyUI name this exporter knows; drop it from the LoRA targets")


def to_comfyui(state: dict[str, torch.Tensor], meta: dict[str, Any] | None, family: str | None = None,
               alpha: float | None = None) -> dict[str, torch.Tensor]:
    modules = _split(state)
    family = family or family_of(list(modules))
    for name, ab in modules.items():
        ab["B"] = ab["B"] * _scale(name, ab["A"].shape[0], meta, alpha)
    out: dict[str, torch.Tensor] = {}
    if family == "zimage":
        for name, ab in modules.items():
            out[f"diffusion_model.{name}.lora_A.weight"] = ab["A"]
            out[f"diffusion_model.{name}.lora_B.weight"] = ab["B"]
        return out
    fused: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, ab in modules.items():
        target, slot = _flux2_name(name)
        if slot is None:
            out[f"diffusion_model.{target}.lora_A.weight"] = ab["A"]
            out[f"diffusion_model.{target}.lora_B.weight"] = ab["B"]
        else:
            fused.setdefault(target, {})[slot] = ab
    for target, parts in fused.items():
        # Exact fusion: A stacked over the parts, B block-diagonal; a missing part gets zero rows.
        order = sorted(parts)
        a = torch.cat([parts[s]["A"] for s in order])
        out_dim = parts[order[0]]["B"].shape[0]
        b = a.new_zeros(3 * out_dim, a.shape[0])
        col = 0
        for s in order:
            r = parts[s]["A"].shape[0]
            b[s * out_dim:(s + 1) * out_dim, col:col + r] = parts[s]["B"]
            col += r
        out[f"diffusion_model.{target}.lora_A.weight"] = a
        out[f"diffusion_model.{target}.lora_B.weight"] = b
    return out


def export(path: str | Path, out: str | Path, fmt: str, family: str | None = None, alpha: float | None = None) -> Path:
    """Convert a dopsd LoRA (diffusers or bare peft keys) to `fmt`; returns the written file."""
    from safetensors.torch import save_file

    state, meta = read_lora(path)
    modules = _split(state)
    family = family or family_of(list(modules))
    if meta is None and alpha is None:
        raise ValueError(f"{path} carries no LoRA config (alpha, rank); pass --alpha")
    out = Path(out)
    if fmt == "comfyui":
        target = out if out.suffix == ".safetensors" else out / "lora_comfyui.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in to_comfyui(state, meta, family, alpha).items()}, str(target),
                  metadata={"format": "pt", "dopsd_family": family})
        return target
    if fmt == "diffusers":
        if any(k.startswith("diffusion_model.") for k in state):
            raise ValueError(f"{path} is already a ComfyUI file; export the diffusers format from the dopsd run instead")
        layers = {f"{name}.lora_{x}.weight": ab[x] for name, ab in modules.items() for x in "AB"}
        if meta is None or "peft_type" not in meta:  # a dopsd run's file: a minimal peft config, exact module names
            ranks = {ab["A"].shape[0] for ab in modules.values()}
            if len(ranks) != 1:
                raise ValueError("modules have different ranks and the file has no config; export from a diffusers file")
            meta = {"r": ranks.pop(), "lora_alpha": alpha if meta is None else meta["lora_alpha"],
                    "target_modules": sorted(modules)}
        folder, name = (out.parent, out.name) if out.suffix == ".safetensors" else (out, WEIGHTS_NAME)
        pipeline_class(family).save_lora_weights(str(folder), transformer_lora_layers=layers, weight_name=name,
                                                 transformer_lora_adapter_metadata=meta)
        return folder / name
    raise ValueError(f"unknown export format {fmt!r}; use 'diffusers' or 'comfyui'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora", help=f"a dopsd run folder ({RUN_LORA} + {RUN_CONFIG}), a folder with {WEIGHTS_NAME}, "
                        "or a LoRA .safetensors file")
    parser.add_argument("--format", choices=("comfyui", "diffusers"), default="comfyui", help="target format")
    parser.add_argument("--out", required=True, help="output .safetensors file or folder")
    parser.add_argument("--model", choices=FAMILIES, default=None, help="model family (default: from the key names)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha, only for files without a stored config")


def main(args: argparse.Namespace) -> int:
    try:
        written = export(args.lora, args.out, args.format, args.model, args.alpha)
    except (ValueError, FileNotFoundError) as err:
        print(f"dopsd export: {err}")
        return 2
    print(f"wrote {written}")
    return 0
