"""The tiny side of benchmarks/gpu_real_scale.py (--tiny, what its test runs on the CPU): part configs of the same
architectures as the full-size Z-Image-Turbo and FLUX.2-klein-4B, as tests/tiny_real.py builds them, and the config
overrides that shrink each preset's run to them."""

from __future__ import annotations

import json
from pathlib import Path

# Part configs (config.json contents) per preset.
TINY = {
    "zimage-turbo": {
        "transformer": dict(
            all_patch_size=[2],
            all_f_patch_size=[1],
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=16,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=[8, 4, 4],
            axes_lens=[256, 32, 32],
        ),
        "text_encoder": dict(
            vocab_size=512,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=2048,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[32, 64],
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=32,
            sample_size=32,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ),
    },
    "flux2-klein-4b": {
        "transformer": dict(
            in_channels=16,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=96,
            axes_dims_rope=[4, 4, 4, 4],
            guidance_embeds=False,
        ),
        "text_encoder": dict(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=27,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=2048,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[16, 16, 32, 32],
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    },
}


# What --tiny sets on top of the preset (after model.pretrained=<the tiny folder>): a small float32 run on the CPU.
TINY_OVERRIDES = (
    "model.height=32",
    "model.width=32",
    "model.dtype=float32",
    "train.mixed_precision=no",
    "lora.rank=4",
    "lora.alpha=8",
    "model.max_caption_tokens=32",
    "model.teacher_max_tokens=64",
)


def write_tiny_folder(root: Path, preset: str) -> Path:
    """A folder with only the parts' config.json files: what `dopsd plan` reads of a local model folder."""
    folder = root / preset
    for part, conf in TINY[preset].items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / "config.json").write_text(json.dumps(conf))
    return folder
