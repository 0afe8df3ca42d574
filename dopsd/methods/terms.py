"""The training methods: each one a list of loss terms, each term one small unit built on dopsd.core.objective.

A method (config `method.name`) is one entry of METHODS: a function of the method config that returns its
terms. A term computes its loss on one micro-batch, runs its own backward (so the roll-out can free each
step's activations) and returns what the step record logs. Prior preservation is a term any method can add
(`method.prior_weight` > 0 with `method.prior_prompts`). A new method is one more entry here, not a branch in
the trainer's loop. The paper's baselines (pso, dreambooth, sft_teacher) are terms in dopsd.methods.baselines; a term
may name prompts it needs contexts for (`Term.prompts`) and do one-time work with the starting model
(`Term.prepare`, e.g. DreamBooth's class images).

Determinism: every random draw of a sample comes from a generator keyed by (seed, step, slot in the global
batch), and the terms draw from it in their fixed order, so a resumed run or a run split across processes
draws exactly what the uninterrupted single-process run drew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from dopsd.core.objective import DistillOutput, dopsd_loss, sample_training_sigmas, sft_loss, step_weights_for
from dopsd.core.sampler import seed_noise
from dopsd.core.weights import ParamShadow
from dopsd.data.cache import DROPPED

if TYPE_CHECKING:
    from dopsd.training.trainer import Trainer


def slot_rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def _torch_gen(rng: np.random.Generator) -> torch.Generator:
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


def micro_batch(trainer: Trainer, step: int, micro: int, indices: list[int], slots: list[int]) -> MicroBatch:
    """Draw each sample's caption variant (its first draws, before any term's)."""
    cfg = trainer.cfg
    rngs = [slot_rng(cfg.train.seed, step, slot) for slot in slots]
    variants = []
    for i, r in zip(indices, rngs):
        c = int(r.integers(len(trainer.examples[i].captions)))
        variants.append(DROPPED if r.random() < cfg.data.caption_dropout else c)
    bucket = trainer.examples[indices[0]].bucket
    return MicroBatch(step, micro, indices, slots, rngs, variants, bucket, trainer.adapter.latent_shape(*bucket))


def _student_keys(trainer: Trainer, b: MicroBatch) -> list[str]:
    return [trainer.feats.student[(i, v)] for i, v in zip(b.indices, b.variants)]


def rollout_loss(
    trainer: Trainer,
    s_ctx: Any,
    t_ctx: Any,
    shadow: ParamShadow,
    noise: torch.Tensor,
    sched: torch.Tensor,
    weight: float,
    final: bool,
    rollout: str = "student",
) -> DistillOutput:
    """One D-OPSD-form loss (per-step backward by default); DDP syncs only on the step's very last backward.
    rollout="teacher": the teacher's steps advance the roll-out (off-policy distillation)."""
    dev, method = trainer.acc.device, trainer.method
    per_step = method.per_step_backward
    out = dopsd_loss(
        trainer.velocity(trainer.student),
        shadow.wrap(trainer.velocity(trainer.network)),
        noise.to(dev, trainer.latent_dtype),
        sched.to(dev),
        s_ctx,
        t_ctx,
        space=method.loss_space,
        step_weights=step_weights_for(method.step_weighting, sched),
        backward=(lambda loss: trainer.acc.backward(loss * weight)) if per_step else None,
        step_context=lambda last: trainer.sync(final and last),
        rollout=rollout,  # type: ignore[arg-type]
    )
    if not per_step:
        trainer.acc.backward(out.loss * weight)  # DDP sync was decided by the last forward's context
    return out


class Term:
    """One loss term. `teacher`: needs the teacher's contexts (caption + target image) and the teacher's
    weights; `latents`: needs the target images' latents; `prior`: needs the original model's weights."""

    name = ""
    teacher = latents = prior = False

    def prompts(self, trainer: Trainer) -> list[str]:
        """Prompts whose caption-only contexts the term needs (computed with the feature cache)."""
        return []

    def prepare(self, trainer: Trainer) -> None:
        """One-time work with the starting model, after the features and before a resumed run's checkpoint."""

    def __call__(self, trainer: Trainer, b: MicroBatch, scale: float, final: bool) -> dict[str, Any]:
        raise NotImplementedError


class OnPolicyDistillation(Term):
    """D-OPSD: the student's own roll-out from noise, matched at each state to the teacher that also sees the
    target image. rollout="teacher" is the off-policy distillation of the paper's ablation: the same loss at the
    teacher's own (caption + image) roll-out states."""

    name, teacher = "dopsd", True

    def __init__(self, rollout: str = "student"):
        self.rollout = rollout
        if rollout == "teacher":
            self.name = "offpolicy"

    def __call__(self, trainer: Trainer, b: MicroBatch, scale: float, final: bool) -> dict[str, Any]:
        noise = seed_noise(b.shape, [int(r.integers(2**62)) for r in b.rngs])
        t_ctx = trainer.contexts([trainer.feats.teacher[(i, v)] for i, v in zip(b.indices, b.variants)])
        out = rollout_loss(
            trainer,
            trainer.contexts(_student_keys(trainer, b)),
            t_ctx,
            trainer.teacher,
            noise,
            trainer.schedule(b.bucket),
            scale,
            final,
            self.rollout,
        )
        return {self.name: float(out.loss.detach()), "steps": out.steps}


class FlowMatching(Term):
    """SFT: flow matching on the target latents with the caption-only context."""

    name, latents = "sft", True

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    def __call__(self, trainer: Trainer, b: MicroBatch, scale: float, final: bool) -> dict[str, Any]:
        dev, f32 = trainer.acc.device, trainer.latent_dtype
        gens = [_torch_gen(r) for r in b.rngs]
        m = trainer.method
        sigma = torch.cat([sample_training_sigmas(1, m.sft_timesteps, shift=m.sft_shift, generator=g) for g in gens])
        noise = torch.stack([torch.randn(b.shape, generator=g) for g in gens])
        x0 = torch.stack([trainer.feats.load(trainer.feats.latents[i])["latents"] for i in b.indices])
        with trainer.sync(final):
            loss = sft_loss(
                trainer.velocity(trainer.student),
                x0.to(dev, f32),
                trainer.contexts(_student_keys(trainer, b)),
                sigma.to(dev, f32),
                noise.to(dev, f32),
            )
            trainer.acc.backward(loss * self.weight * scale)
        return {"sft": float(loss.detach()) * self.weight}


class PriorPreservation(Term):
    """On-policy prior preservation: on unrelated prompts the student's roll-out is matched to the original
    model, caption-only on both sides. Its prompts and noise come from their own generators (slot, 1)."""

    name, prior = "prior", True

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, trainer: Trainer, b: MicroBatch, scale: float, final: bool) -> dict[str, Any]:
        m, seed = trainer.method, trainer.cfg.train.seed
        n = m.prior_batch_size
        base = (b.micro * trainer.world + trainer.rank) * n
        rngs = [slot_rng(seed, b.step, slot, 1) for slot in range(base, base + n)]
        prompts = [m.prior_prompts[int(r.integers(len(m.prior_prompts)))] for r in rngs]
        size = (trainer.m.height, trainer.m.width)
        noise = seed_noise(trainer.adapter.latent_shape(*size), [int(r.integers(2**62)) for r in rngs])
        ctx = trainer.contexts([trainer.feats.prompts[p] for p in prompts])
        out = rollout_loss(trainer, ctx, ctx, trainer.prior, noise, trainer.schedule(size), self.weight * scale, final)
        return {"prior": float(out.loss.detach()) * self.weight}


# method.name -> its terms (in the order they draw from each sample's generator)
METHODS: dict[str, Callable[[Any], list[Term]]] = {
    "dopsd": lambda m: [OnPolicyDistillation()],
    "sft": lambda m: [FlowMatching()],
    "hybrid": lambda m: [OnPolicyDistillation(), FlowMatching(m.sft_weight)],
    "offpolicy": lambda m: [OnPolicyDistillation(rollout="teacher")],
    "pso": lambda m: [_baselines().PairwiseSampleOptimization()],
    "dreambooth": lambda m: [FlowMatching(), _baselines().ClassImagePrior(m.class_weight)],
    "sft_teacher": lambda m: [_baselines().TeacherSampleFlowMatching()],
}


def _baselines() -> Any:
    from dopsd.methods import baselines  # it builds on this module's Term and MicroBatch

    return baselines


def terms_for(method: Any) -> list[Term]:
    """The loss terms of the configured method, plus prior preservation when it is configured."""
    terms = METHODS[method.name](method)
    if method.prior_weight > 0 and method.prior_prompts:
        terms.append(PriorPreservation(method.prior_weight))
    return terms


def micro_step(trainer: Trainer, terms: list[Term], b: MicroBatch, final_micro: bool, scale: float) -> dict[str, Any]:
    """Forward + backward of every term on this process's part of one micro-batch; the logs of each term and
    their sum `loss`. Only the last backward of the optimizer step may all-reduce gradients under DDP."""
    logs: dict[str, Any] = {}
    for term in terms:
        logs.update(term(trainer, b, scale, final_micro and term is terms[-1]))
    logs["loss"] = sum(logs[t.name] for t in terms)
    return logs
