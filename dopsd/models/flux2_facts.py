"""FLUX.2-klein facts that need no weights: its few-step setting and schedule, packed-token position ids, LoRA
targets and interchange layout, the modules left unquantized, the published transformer sizes and what the
reference-path teacher reads after the caption. The adapter (dopsd.models.flux2) and the planner
(dopsd.models.flux2_plan) both read them from here."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from dopsd.core.schedules import dynamic_schedule
from dopsd.models.base import LoraLayout, Pair

STEPS = 4  # klein's own few-step setting

# `attn.to_out` is a ModuleList in double blocks (peft rejects it), a Linear in single blocks: hence a regex.
LORA_TARGETS = (
    r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|.*single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
)
# Left unquantized under model.quantize: the input/output projections, the final norm and the timestep embedder
# (small next to the blocks, and what every token passes through first or last).
QUANTIZE_SKIP = ("x_embedder", "context_embedder", "time_guidance_embed", "norm_out", "proj_out")
# The interchange layout is the original (BFL) module names, which ComfyUI matches directly and diffusers converts:
# q/k/v of a double block are fused exactly into `{img,txt}_attn.qkv`. Rows: (diffusers module, BFL module, q/k/v
# slot or None); `{i}` is a block index. Only modules both ComfyUI and diffusers map are listed.
LORA_LAYOUT = LoraLayout(
    rows=(
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
    ),
    placeholders=(("i", r"\d+"),),
    sign=r"(^|\.)(single_)?transformer_blocks\.\d+\.|(^|\.)(double|single)_blocks\.\d+\.",
    implementation="https://github.com/black-forest-labs/flux2",
)
# Published transformer sizes (double blocks, single blocks, width) → (variant, modelspec architecture,
# ss_base_model_version). Both ids are the ones kohya's trainers (musubi-tuner) write, so UIs group the files.
VARIANTS = {
    (5, 20, 3072): ("FLUX.2-klein 4B", "Flux.2-klein-4b", "flux_2_klein_4b"),
    (8, 24, 4096): ("FLUX.2-klein 9B", "Flux.2-klein-9b", "flux_2_klein_9b"),
}


# What the reference-path teacher reads after the caption when model.teacher_instruction is null.
REFERENCE_INSTRUCTION = "Make the main subject, background and overall composition consistent with the reference image."
EDIT_INSTRUCTION = "The last reference image is the expected output of this edit."


def position_ids(t: int, h: int, w: int) -> torch.Tensor:
    """(h·w, 4) position ids (T, H, W, L) of one packed image, row-major like the pipeline's."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))


def flux2_empirical_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's resolution- and step-dependent shift μ (same constants as diffusers' Flux2KleinPipeline)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * steps + (m_200 - 200.0 * slope))


def flux2_schedule(steps: int, image_seq_len: int) -> torch.Tensor:
    """FLUX.2-klein inference schedule: dynamic shift from the packed image token count."""
    return dynamic_schedule(steps, flux2_empirical_mu(image_seq_len, steps))


def transformer_size(
    network: nn.Module | None = None, lora: Mapping[str, Pair] | None = None
) -> tuple[int, ...] | None:
    """(double blocks, single blocks, width) from the transformer's config, else from a LoRA's shapes."""
    if network is not None:
        try:
            c = network.config
            return (int(c.num_layers), int(c.num_single_layers), int(c.num_attention_heads * c.attention_head_dim))
        except AttributeError:
            return None
    if not lora:
        return None

    def blocks(prefix: str) -> int:
        ids = [int(m.split(".")[1]) for m in lora if m.startswith(prefix) and m.split(".")[1].isdigit()]
        return max(ids) + 1 if ids else 0

    width = next((a.shape[1] for m, (a, _) in lora.items() if m.endswith(("attn.to_q", "attn.to_qkv_mlp_proj"))), None)
    if width is None:
        return None
    return (blocks("transformer_blocks."), blocks("single_transformer_blocks."), int(width))


def teacher_instruction(cfg: Any) -> str:
    """What the reference-path teacher reads after the caption: model.teacher_instruction, else the family's own
    (the edit instruction for editing LoRAs)."""
    if cfg.teacher_instruction is not None:
        return str(cfg.teacher_instruction)
    return EDIT_INSTRUCTION if cfg.editing else REFERENCE_INSTRUCTION


def with_instruction(captions: list[str], instruction: str) -> list[str]:
    return [f"{c.rstrip()} {instruction}".strip() for c in captions]
