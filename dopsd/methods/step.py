"""What a loss term sees of a training step, and the base of every term.

`StepContext` is the whole of what a term may use: the config, the model adapter, the cached features, the
network (as the loss calls it, and unwrapped), the teacher and prior weight shadows, which process this is, and
the step's few services (`contexts`, `velocity`, `schedule`, `sync`, `backward`, `gather`). The Trainer
(dopsd.training.trainer) implements it; a term never sees the trainer itself, so the loop's own state (step,
optimizer, history, checkpoints) stays the trainer's. tests/test_code_layout.py checks that the terms use no
other member.

Determinism: every random draw of a sample comes from a generator keyed by (seed, step, slot in the global
batch), and the terms draw from it in their fixed order, so a resumed run or a run split across processes
draws exactly what the uninterrupted single-process run drew.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from dopsd.core.weights import ParamShadow
from dopsd.data.cache import DROPPED

if TYPE_CHECKING:
    from dopsd.config import Config
    from dopsd.data.cache import Features
    from dopsd.data.dataset import Example
    from dopsd.models.base import ModelAdapter

Velocity = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (x_σ, σ, contexts) -> v


class StepContext(Protocol):
    """What a loss term may use of the training step it runs in."""

    cfg: Config
    adapter: ModelAdapter
    feats: Features  # the cached contexts and latents, by key
    examples: list[Example]  # the training pairs (captions, bucket)
    student: nn.Module  # the trained network as the loss calls it (wrapped for DDP / FSDP)
    network: nn.Module  # the same network unwrapped: sampling without gradient, teacher and prior forwards
    teacher: ParamShadow | None  # the teacher's weights (EMA / base / live), when a term needs them
    prior: ParamShadow | None  # the original model's weights, when a term needs them
    world: int  # processes
    rank: int  # this process
    device: torch.device
    latent_dtype: torch.dtype  # latents and roll-outs (float32 whatever the weights' dtype)

    def contexts(self, keys: list[str]) -> Any:
        """Cached contexts by key, on the device and collated into one batch."""
        ...

    def velocity(self, network: nn.Module) -> Velocity:
        """The adapter's velocity of `network` in dopsd's σ convention."""
        ...

    def schedule(self, bucket: tuple[int, int]) -> torch.Tensor:
        """The roll-out's σ schedule for a bucket (height, width)."""
        ...

    def sync(self, final: bool) -> AbstractContextManager:
        """Around a backward: DDP all-reduces gradients only on the optimizer step's last one (`final`)."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss (mixed-precision scaling included)."""
        ...

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor`, concatenated in rank order."""
        ...


def slot_rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


@dataclass
class MicroBatch:
    """This process's part of one micro-batch: which examples, their global slots and per-sample generators."""

    step: int
    micro: int  # index of the micro-batch within the optimizer step (gradient accumulation)
    indices: list[int]
    slots: list[int]
    rngs: list[np.random.Generator]
    variants: list[int]  # caption index per sample (DROPPED: the caption dropped out)
    bucket: tuple[int, int]
    shape: tuple[int, ...]  # latent shape of one sample


def micro_batch(ctx: StepContext, step: int, micro: int, indices: list[int], slots: list[int]) -> MicroBatch:
    """Draw each sample's caption variant (its first draws, before any term's)."""
    cfg = ctx.cfg
    rngs = [slot_rng(cfg.train.seed, step, slot) for slot in slots]
    variants = []
    for i, r in zip(indices, rngs):
        c = int(r.integers(len(ctx.examples[i].captions)))
        variants.append(DROPPED if r.random() < cfg.data.caption_dropout else c)
    bucket = ctx.examples[indices[0]].bucket
    return MicroBatch(step, micro, indices, slots, rngs, variants, bucket, ctx.adapter.latent_shape(*bucket))


def student_keys(ctx: StepContext, b: MicroBatch) -> list[str]:
    """The caption-only contexts of the micro-batch's samples (their drawn caption variants)."""
    return [ctx.feats.student[(i, v)] for i, v in zip(b.indices, b.variants)]


def teacher_keys(ctx: StepContext, b: MicroBatch) -> list[str]:
    """The teacher's contexts (caption + target image) of the micro-batch's samples."""
    return [ctx.feats.teacher[(i, v)] for i, v in zip(b.indices, b.variants)]


class Term:
    """One loss term. `teacher`: needs the teacher's contexts (caption + target image) and the teacher's
    weights; `latents`: needs the target images' latents; `prior`: needs the original model's weights."""

    name = ""
    teacher = latents = prior = False

    def prompts(self, ctx: StepContext) -> list[str]:
        """Prompts whose caption-only contexts the term needs (computed with the feature cache)."""
        return []

    def prepare(self, ctx: StepContext) -> None:
        """One-time work with the starting model, after the features and before a resumed run's checkpoint."""

    def __call__(self, ctx: StepContext, b: MicroBatch, scale: float, final: bool) -> dict[str, Any]:
        raise NotImplementedError
