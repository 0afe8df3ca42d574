"""Encoder calls the diffusers families share in their plans (`dopsd plan`): a Qwen3 caption batch, the Qwen3-VL
teacher encoder and a VAE encode, each as a PlanStage run on fake tensors (dopsd.models.base.PlanStage)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dopsd.models.registry import model_config


def qwen_text_plan_run(max_tokens: int, batch: int = 8, **kwargs: Any):
    """The feature cache's text-encoder call: a batch of captions padded to max_tokens, every hidden state kept."""

    def run(parts: dict[str, nn.Module], height: int, width: int) -> Any:
        ids = torch.zeros(batch, max_tokens, dtype=torch.long)
        mask = torch.ones(batch, max_tokens, dtype=torch.bool)
        return parts["text_encoder"](input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)

    return run


def qwen_vl_plan(teacher_folder: Any, dtype: torch.dtype, tokens: int):
    """(builder, stage run, source) of the Qwen3-VL teacher encoder for planning.

    The run covers its language model over `tokens` positions (image + caption) with every hidden state kept;
    the vision tower's own activations (one image, no grad) are not run: its index bookkeeping needs real
    values, which fake tensors do not have. Its weights are counted."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    conf, source = model_config(teacher_folder, "qwen3-vl-4b-instruct")

    def build(_: dict[str, int]) -> nn.Module:
        return Qwen3VLModel(Qwen3VLConfig(**conf))

    hidden = int(conf["text_config"]["hidden_size"])

    def run(parts: dict[str, nn.Module], height: int, width: int) -> Any:
        emb = torch.zeros(1, tokens, hidden, dtype=dtype)
        pos = torch.zeros(3, 1, tokens, dtype=torch.long)  # M-RoPE ids (their values do not change memory)
        return parts["vlm"].language_model(inputs_embeds=emb, position_ids=pos, output_hidden_states=True)

    return build, run, source


def vae_plan_run(dtype: torch.dtype):
    """The feature cache's VAE call: one image at the training size (encode_images runs them one by one)."""

    def run(parts: dict[str, nn.Module], height: int, width: int) -> Any:
        return parts["vae"].encode(torch.zeros(1, 3, height, width, dtype=dtype)).latent_dist.mode()

    return run
