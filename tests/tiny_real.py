"""Tiny random models of the real architectures, saved in the diffusers layout (no hub, no downloads).

Each builder writes a folder that `ZImagePipeline.from_pretrained` / `Flux2KleinPipeline.from_pretrained`
load offline, with a locally trained byte-level BPE tokenizer carrying the Qwen special tokens. The
configs follow diffusers' own tests; weights are random (seeded) and a few are perturbed on purpose
(pad tokens, VAE batch-norm statistics) so that the conventions they pin actually matter. The tiny encoders
(Qwen3-VL, DINOv2, CLIP) are in tests/tiny_encoders.py; the helpers for runs on these models are here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image

# The tiny part configs live with benchmarks/gpu_real_scale.py's --tiny, which runs the same architectures.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from full_size.folders import scheduler as published_scheduler  # noqa: E402
from full_size.tokenizer import CHAT_TEMPLATE  # noqa: E402  (the one Qwen3 template in miniature)
from gpu_real_scale_tiny import TINY  # noqa: E402

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]
CORPUS = [
    "a photo of a red cat on a mat",
    "a blue dog in the park",
    "a [V] teapot on a wooden table",
    "make the main subject background and overall composition consistent with the reference image",
    "turn the sky orange",
    "the last image is the expected output",
    "user assistant system",
]
VOCAB = 512  # embedding size of the tiny text encoders (>= tokenizer size)


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    qt = Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    qt.chat_template = CHAT_TEMPLATE
    assert len(qt) <= VOCAB
    qt.save_pretrained(path)
    return qt


def _text_config(parts: dict):
    from transformers import Qwen3Config

    return Qwen3Config(**parts["text_encoder"], rope_theta=10000.0, tie_word_embeddings=False)


def _fill_pad_tokens(transformer) -> None:
    # Created uninitialised in real loads; random here so padding is exercised, never NaN.
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()


def build_zimage(path: Path, seed: int = 0) -> Path:
    """Z-Image-Turbo layout: transformer, vae, text_encoder (Qwen3Model), tokenizer, scheduler (static shift 3); the
    part configs are benchmarks/gpu_real_scale_tiny.py's (one set of tiny architectures for tests and --tiny)."""
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    path, parts = Path(path), TINY["zimage-turbo"]
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**parts["transformer"])
    _fill_pad_tokens(transformer)
    vae = AutoencoderKL(**parts["vae"])
    text_encoder = Qwen3Model(_text_config(parts))
    scheduler = published_scheduler("zimage-turbo")
    tokenizer = build_tokenizer(path / "tokenizer")
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.save_pretrained(path)
    return path


def build_flux2(path: Path, seed: int = 0) -> Path:
    """FLUX.2-klein layout: Flux2Transformer2DModel, AutoencoderKLFlux2, Qwen3ForCausalLM (27 layers so
    klein's default feature layers 9/18/27 exist), tokenizer, dynamic-shift scheduler, is_distilled."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    path, parts = Path(path), TINY["flux2-klein-4b"]
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(**parts["transformer"])
    vae = AutoencoderKLFlux2(**parts["vae"])
    with torch.no_grad():  # non-trivial batch-norm statistics: the latent normalisation must be applied
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    text_encoder = Qwen3ForCausalLM(_text_config(parts))
    scheduler = published_scheduler("flux2-klein-4b")
    tokenizer = build_tokenizer(path / "tokenizer")
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    pipe.save_pretrained(path)
    return path


def images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Random smooth RGB images (low-frequency noise upsampled), deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        low = torch.rand(3, 4, 4, generator=g)
        arr = torch.nn.functional.interpolate(low[None], size=(size, size), mode="bilinear")[0]
        out.append(Image.fromarray((arr.permute(1, 2, 0).numpy() * 255).astype("uint8")))
    return out


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


def dopsd_lora_steps(
    adapter,
    captions: list[str],
    images: list[Image.Image],
    steps: int = 3,
    lr: float = 1e-2,
    rank: int = 4,
    alpha: float = 8.0,
    every: int = 1,
    seed: int = 0,
) -> dict:
    """A few real D-OPSD steps (LoRA, EMA teacher, per-step backward) on a tiny adapter.

    Returns the first step's gradients by parameter name, the losses, the shadow and the student contexts."""
    from dopsd.core.objective import dopsd_loss
    from dopsd.core.schedules import training_schedule
    from dopsd.core.weights import ParamShadow, trainable_parameters
    from dopsd.lora.inject import add_lora

    torch.manual_seed(seed)
    add_lora(adapter.network, adapter.default_lora_targets(), rank, alpha)
    params = trainable_parameters(adapter.network)
    shadow = ParamShadow(params, "ema", 0.9)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    student_ctx = adapter.collate(adapter.student_contexts(captions))
    teacher_ctx = adapter.collate(adapter.teacher_contexts(captions, images))
    w, h = images[0].size
    schedule = training_schedule(adapter.inference_schedule(h, w), every)
    velocity = lambda x, s, c: adapter.velocity(adapter.network, x, s, c)
    g = torch.Generator().manual_seed(seed)
    first, losses = None, []
    for _ in range(steps):
        noise = torch.randn(len(captions), *adapter.latent_shape(h, w), generator=g)
        out = dopsd_loss(
            velocity,
            shadow.wrap(velocity),
            noise,
            schedule,
            student_ctx,
            teacher_ctx,
            backward=lambda loss: loss.backward(),
        )
        if first is None:
            first = {n: (None if p.grad is None else p.grad.clone()) for n, p in adapter.network.named_parameters()}
        losses.append(float(out.loss))
        opt.step()
        opt.zero_grad()
        shadow.update()
    return {"grads": first, "losses": losses, "shadow": shadow, "student_ctx": student_ctx, "teacher_ctx": teacher_ctx}


def write_pairs(folder: Path, captions: list[str], size: int, seed: int = 0, prefix: str = "img") -> Path:
    """A dataset folder: one random image per caption with a same-name .txt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (im, cap) in enumerate(zip(images(len(captions), size, seed), captions)):
        im.save(folder / f"{prefix}{i}.png")
        (folder / f"{prefix}{i}.txt").write_text(cap)
    return folder


def train_config(preset: str, root: Path, data: Path, size: int, *extra: str):
    """A 2-step CPU run of a real-model preset on a tiny model (float32, no progress bar, cache in root)."""
    from dopsd.config import load_config

    return load_config(
        preset,
        [
            f"model.height={size}",
            f"model.width={size}",
            "model.dtype=float32",
            "model.max_caption_tokens=32",
            f"data.path={data}",
            "data.buckets=false",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.mixed_precision='no'",
            "train.device=cpu",
            "train.checkpoint_every=0",
            "sample.every=0",
            "sample.control_steps=0",
            "sample.seeds=[0]",
            "log.progress=false",
            "log.tensorboard=false",
            f"cache.dir={root / 'cache'}",
            "lora.rank=4",
            "lora.alpha=8",
            "optim.lr=1e-3",
            f"train.output_dir={root / 'run'}",
            *extra,
        ],
    )


def model_config(family: str, **fields):
    """The typed model section (dopsd.config.ModelConfig) of a family, with the family's own teacher context
    unless given (FLUX.2: the reference path; the others: the VLM)."""
    from dopsd.config import ModelConfig

    teacher = "reference" if family == "flux2" else "vlm"
    return ModelConfig(**{"family": family, "teacher_context": teacher, **fields})
