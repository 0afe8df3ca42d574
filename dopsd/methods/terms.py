"""The training methods: each one a list of loss terms, each term one small unit built on dopsd.core.objective.

A method (config `method.name`) is one entry of METHODS: a function of the method config that returns its
terms. A term computes its loss on one micro-batch, runs its own backward (so the roll-out can free each
step's activations) and returns what the step record logs. It sees the step through `StepContext`
(dopsd.methods.step), never the trainer. Prior preservation is a term any method can add
(`method.prior_weight` > 0 with `method.prior_prompts`). A new method is one more entry here, not a branch in
the trainer's loop. The paper's baselines (pso, dreambooth, sft_teacher) are terms in dopsd.methods.baselines; a term
may name prompts it needs contexts for (`Term.prompts`) and do one-time work with the starting model
(`Term.prepare`, e.g. DreamBooth's class images).
Determinism: dopsd.methods.step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from dopsd.core.objective import DistillOutput, dopsd_loss, sample_training_sigmas, sft_loss, step_weights_for
from dopsd.core.sampler import seed_noise
from dopsd.core.weights import ParamShadow
from dopsd.methods.baselines import ClassImagePrior, PairwiseSampleOptimization, TeacherSampleFlowMatching
from dopsd.methods.step import (
    MicroBatch,
    StepContext,
    Term,
    micro_batch,
    slot_rng,
    student_keys,
    teacher_keys,
    torch_generator,
)

__all__ = ["METHODS", "MicroBatch", "StepContext", "Term", "micro_batch", "micro_step", "slot_rng", "terms_for"]

SUBSET_STREAM = 2  # (seed, step, 0, 2): the trained roll-out states' own generator (the prior's end in 1)


def trained_states(ctx: StepContext, b: MicroBatch, num_steps: int) -> list[int] | None:
    """`method.train_states` of the K roll-out states, drawn uniformly without replacement (None: all K).
    Keyed by the optimizer step alone: every micro-batch and process trains the same states, so gradient
    accumulation and any split of the batch over processes compute what one large batch would, and the
    samples' own generators are untouched."""
    k = ctx.cfg.method.train_states
    if k == 0 or k >= num_steps:
        return None
    rng = slot_rng(ctx.cfg.train.seed, b.step, 0, SUBSET_STREAM)
    return sorted(int(i) for i in rng.choice(num_steps, size=k, replace=False))


def rollout_loss(
    ctx: StepContext,
    s_ctx: Any,
    t_ctx: Any,
    shadow: ParamShadow,
    noise: torch.Tensor,
    sched: torch.Tensor,
    weight: float,
    final: bool,
    rollout: str = "student",
    states: list[int] | None = None,
) -> DistillOutput:
    """One D-OPSD-form loss (per-step backward by default); DDP syncs only on the step's very last backward.
    rollout="teacher": the teacher's steps advance the roll-out (off-policy distillation). states: the trained
    roll-out states (`trained_states`; None = all)."""
    dev, method = ctx.device, ctx.cfg.method
    per_step = method.per_step_backward
    out = dopsd_loss(
        ctx.velocity(ctx.student),
        shadow.wrap(ctx.velocity(ctx.network)),
        noise.to(dev, ctx.latent_dtype),
        sched.to(dev),
        s_ctx,
        t_ctx,
        space=method.loss_space,
        step_weights=step_weights_for(method.step_weighting, sched),
        backward=(lambda loss: ctx.backward(loss * weight)) if per_step else None,
        step_context=lambda last: ctx.sync(final and last),
        rollout=rollout,  # type: ignore[arg-type]
        states=states,
    )
    if not per_step:
        ctx.backward(out.loss * weight)  # DDP sync was decided by the last forward's context
    return out


class OnPolicyDistillation(Term):
    """D-OPSD: the student's own roll-out from noise, matched at each state to the teacher that also sees the
    target image. rollout="teacher" is the off-policy distillation of the paper's ablation: the same loss at the
    teacher's own (caption + image) roll-out states."""

    name, teacher = "dopsd", True

    def __init__(self, rollout: str = "student"):
        self.rollout = rollout
        if rollout == "teacher":
            self.name = "offpolicy"

    def __call__(self, ctx: StepContext, b: MicroBatch, scale: float, final: bool) -> dict[str, Any]:
        noise = seed_noise(b.shape, [int(r.integers(2**62)) for r in b.rngs])
        assert ctx.teacher is not None, "the teacher's weights are set up for a term with teacher = True"
        sched = ctx.schedule(b.bucket)
        out = rollout_loss(
            ctx,
            ctx.contexts(student_keys(ctx, b)),
            ctx.contexts(teacher_keys(ctx, b)),
            ctx.teacher,
            noise,
            sched,
            scale,
            final,
            self.rollout,
            trained_states(ctx, b, len(sched) - 1),
        )
        return {self.name: float(out.loss.detach()), "steps": out.steps}


class FlowMatching(Term):
    """SFT: flow matching on the target latents with the caption-only context."""

    name, latents = "sft", True

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    def __call__(self, ctx: StepContext, b: MicroBatch, scale: float, final: bool) -> dict[str, Any]:
        dev, f32 = ctx.device, ctx.latent_dtype
        gens = [torch_generator(r) for r in b.rngs]
        m = ctx.cfg.method
        sigma = torch.cat([sample_training_sigmas(1, m.sft_timesteps, shift=m.sft_shift, generator=g) for g in gens])
        noise = torch.stack([torch.randn(b.shape, generator=g) for g in gens])
        x0 = torch.stack([ctx.feats.load(ctx.feats.latents[i])["latents"] for i in b.indices])
        with ctx.sync(final):
            loss = sft_loss(
                ctx.velocity(ctx.student),
                x0.to(dev, f32),
                ctx.contexts(student_keys(ctx, b)),
                sigma.to(dev, f32),
                noise.to(dev, f32),
            )
            ctx.backward(loss * self.weight * scale)
        return {"sft": float(loss.detach()) * self.weight}


class PriorPreservation(Term):
    """On-policy prior preservation: on unrelated prompts the student's roll-out is matched to the original
    model, caption-only on both sides. Its prompts and noise come from their own generators (slot, 1)."""

    name, prior = "prior", True

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, ctx: StepContext, b: MicroBatch, scale: float, final: bool) -> dict[str, Any]:
        m, seed = ctx.cfg.method, ctx.cfg.train.seed
        n = m.prior_batch_size
        base = (b.micro * ctx.world + ctx.rank) * n
        rngs = [slot_rng(seed, b.step, slot, 1) for slot in range(base, base + n)]
        prompts = [m.prior_prompts[int(r.integers(len(m.prior_prompts)))] for r in rngs]
        size = (ctx.cfg.model.height, ctx.cfg.model.width)
        noise = seed_noise(ctx.adapter.latent_shape(*size), [int(r.integers(2**62)) for r in rngs])
        plain = ctx.contexts([ctx.feats.prompts[p] for p in prompts])
        assert ctx.prior is not None, "the prior's weights are set up for a term with prior = True"
        sched = ctx.schedule(size)
        states = trained_states(ctx, b, len(sched) - 1)
        out = rollout_loss(ctx, plain, plain, ctx.prior, noise, sched, self.weight * scale, final, states=states)
        return {"prior": float(out.loss.detach()) * self.weight}


# method.name -> its terms (in the order they draw from each sample's generator)
METHODS: dict[str, Callable[[Any], list[Term]]] = {
    "dopsd": lambda m: [OnPolicyDistillation()],
    "sft": lambda m: [FlowMatching()],
    "hybrid": lambda m: [OnPolicyDistillation(), FlowMatching(m.sft_weight)],
    "offpolicy": lambda m: [OnPolicyDistillation(rollout="teacher")],
    "pso": lambda m: [PairwiseSampleOptimization()],
    "dreambooth": lambda m: [FlowMatching(), ClassImagePrior(m.class_weight)],
    "sft_teacher": lambda m: [TeacherSampleFlowMatching()],
}


def terms_for(method: Any) -> list[Term]:
    """The loss terms of the configured method, plus prior preservation when it is configured."""
    terms = METHODS[method.name](method)
    if method.prior_weight > 0 and method.prior_prompts:
        terms.append(PriorPreservation(method.prior_weight))
    return terms


def micro_step(ctx: StepContext, terms: list[Term], b: MicroBatch, final_micro: bool, scale: float) -> dict[str, Any]:
    """Forward + backward of every term on this process's part of one micro-batch; the logs of each term and
    their sum `loss`. Only the last backward of the optimizer step may all-reduce gradients under DDP."""
    logs: dict[str, Any] = {}
    for term in terms:
        logs.update(term(ctx, b, scale, final_micro and term is terms[-1]))
    logs["loss"] = sum(logs[t.name] for t in terms)
    return logs
