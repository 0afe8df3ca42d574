"""Tiny random encoders beside the diffusion models (no hub, no downloads): the Qwen3-VL teacher encoder, and the
DINOv2 / CLIP feature models the evaluation reads. Each builder writes a folder the transformers classes load
offline, with tests/tiny_real.py's byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_real import VOCAB, build_tokenizer, write_json


def build_qwen3_vl(
    path: Path, text_hidden: int = 16, text_layers: int = 2, seed: int = 0, intermediate: int | None = None
) -> Path:
    """A Qwen3-VL folder (model, tokenizer, PIL image processor config) whose language model has the
    given width/depth, so Z-Image's tiny Qwen3 weights can (or, on purpose, cannot) be transplanted."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(path)
    heads = 2
    head_dim = text_hidden // heads
    quarter = head_dim // 2  # mrope_section must sum to head_dim / 2
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=text_hidden,
            intermediate_size=intermediate or 2 * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=head_dim,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [quarter - 2 * (quarter // 4), quarter // 4, quarter // 4],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=text_hidden,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    Qwen3VLForConditionalGeneration(config).save_pretrained(path)
    Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
    ).save_pretrained(path)
    return path


def _preprocessor(path: Path, size: int) -> None:
    write_json(
        path / "preprocessor_config.json",
        {
            "do_resize": True,
            "size": {"shortest_edge": size},
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    )


def build_dinov2(path: Path, seed: int = 0) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    path = Path(path)
    torch.manual_seed(seed)
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(path)
    _preprocessor(path, 32)
    return path


def build_clip(path: Path, seed: int = 0) -> Path:
    """Tiny CLIP; the tokenizer pads with its EOS token, where CLIP pools the text."""
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    path = Path(path)
    torch.manual_seed(seed)
    qt = build_tokenizer(path / "_qwen")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=qt.backend_tokenizer, pad_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            eos_token_id=eos,
            pad_token_id=eos,
            bos_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    _preprocessor(path, 32)
    return path
