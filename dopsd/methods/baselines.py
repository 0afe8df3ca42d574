"""The paper's baselines as loss terms (dopsd.methods.step.Term, listed in dopsd.methods.terms' METHODS): PSO, DreamBooth's class prior, SFT on teacher samples.

Each is built from dopsd.core.objective (`pso_loss`, `sft_loss`) and talks to the model only through the adapter
protocol (`velocity`, `collate`, `latent_shape`, `inference_schedule`). Off-policy distillation needs no term
of its own: it is `OnPolicyDistillation(rollout="teacher")` in dopsd.methods.terms.

Determinism, as for every term: a sample's draws come from its (seed, step, slot) generator in a fixed order,
after the draws of the terms before it; DreamBooth's class images are a function of the config and the
starting weights (sampled in `prepare`, before a resumed run loads its checkpoint), so a resumed run sees
exactly the images the uninterrupted one saw.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from dopsd.core.objective import pso_loss, sample_schedule_sigmas, sample_training_sigmas, sft_loss
from dopsd.core.sampler import inference_mode, sample_euler, seed_noise
from dopsd.methods.step import MicroBatch, StepContext, Term, slot_rng, student_keys, teacher_keys, torch_generator

# The class-image pool's noise generators: keyed (seed, CLASS_KEY, i), a "step" no training step reaches, so
# they never coincide with a sample's (seed, step, slot) generator.
CLASS_KEY = 2**40 + 1


def inference_schedule(ctx: StepContext, bucket: tuple[int, int]) -> torch.Tensor:
    """The model's own few-step sampling schedule (model.inference_steps): what a user's sample runs."""
    return ctx.adapter.inference_schedule(bucket[0], bucket[1], ctx.cfg.model.inference_steps)


def _x0(ctx: StepContext, b: MicroBatch) -> torch.Tensor:
    return torch.stack([ctx.feats.load(ctx.feats.latents[i])["latents"] for i in b.indices])


def class_prompts(method: Any, data: Any, captions: list[str]) -> list[str]:
    """method.class_prompts, else each distinct training caption without the trigger word and the placeholder
    ("a sks dog on grass" → "a dog on grass"): what the model draws for the class without the concept."""
    if method.class_prompts:
        return list(method.class_prompts)
    words = [w for w in (data.trigger_word, data.placeholder) if w]
    out = []
    for caption in captions:
        for w in words:
            caption = re.sub(rf"(?<!\w){re.escape(w)}(?!\w)", " ", caption)
        caption = " ".join(caption.split()).replace(" ,", ",")
        out.append(caption)
    return list(dict.fromkeys(out))


class PairwiseSampleOptimization(Term):
    """Online PSO (Miao et al., ICLR 2025) for concept tuning: each target is paired with a reference image the
    *current* model samples for the same caption with its own few steps (no gradient); both are noised with
    the same ε at one of the model's own few-step σ's and compared by `pso_loss` — the DPO form against the
    frozen starting model (the same weights with the trainable values at their start: under LoRA the adapter
    at zero, i.e. the base, no second copy of it), or the released code's hinge form.
    Draws per sample: reference noise, pair noise, σ (one torch generator from the sample's generator)."""

    name, latents, prior = "pso", True, True

    def __call__(self, ctx: StepContext, b: MicroBatch, scale: float, final: bool) -> dict[str, Any]:
        dev, f32, m = ctx.device, ctx.latent_dtype, ctx.cfg.method
        gens = [torch_generator(r) for r in b.rngs]
        sched = inference_schedule(ctx, b.bucket)
        ref_noise = torch.stack([torch.randn(b.shape, generator=g) for g in gens])
        noise = torch.stack([torch.randn(b.shape, generator=g) for g in gens])
        sigma = torch.cat([sample_schedule_sigmas(1, sched, generator=g) for g in gens])
        caption = ctx.contexts(student_keys(ctx, b))
        live = ctx.velocity(ctx.network)
        with inference_mode(ctx.network):  # the current model's own few-step sample, as at inference
            reference = sample_euler(live, ref_noise.to(dev, f32), sched.to(dev), caption)
        assert ctx.prior is not None, "the prior's weights are set up for a term with prior = True"
        frozen = ctx.prior.wrap(live) if m.pso_form == "dpo" else None
        with ctx.sync(final):
            out = pso_loss(
                ctx.velocity(ctx.student),
                _x0(ctx, b).to(dev, f32),
                reference.detach(),
                caption,
                sigma.to(dev, f32),
                noise.to(dev, f32),
                beta=m.pso_beta,
                ref_weight=m.pso_ref_weight,
                prior_weight=m.pso_prior_weight,
                form=m.pso_form,
                reference_model=frozen,
            )
            ctx.backward(out.loss * scale)
        return {
            "pso": float(out.loss.detach()),
            "pso/margin": float(out.margin.mean()),
            "pso/implicit_acc": out.implicit_accuracy,
            "pso/target_error": float(out.target_error.mean()),
            "pso/reference_error": float(out.reference_error.mean()),
        }


class ClassImagePrior(Term):
    """DreamBooth's class-prior preservation (Ruiz et al. 2023): flow matching on class images the *starting*
    model drew for class prompts with its own few steps (sampled once, before step 0), weight
    method.class_weight, its own σ (method.sft_timesteps) and noise. Unlike method.prior_* (on-policy: the
    student's roll-outs on unrelated prompts matched to the original model's predictions, nothing stored), it
    regresses onto stored images, at SFT's σ's. Draws per sample: the class image's index, then σ and noise."""

    name = "class"

    def __init__(self, weight: float):
        self.weight = weight
        self.prompts_: list[str] = []
        self.pool: torch.Tensor | None = None  # the class images' latents (N, …), float32 on the CPU
        self.keys: list[str] = []

    def prompts(self, ctx: StepContext) -> list[str]:
        self.prompts_ = class_prompts(ctx.cfg.method, ctx.cfg.data, [c for e in ctx.examples for c in e.captions])
        return self.prompts_

    def prepare(self, ctx: StepContext) -> None:
        n, seed = ctx.cfg.method.class_images, ctx.cfg.train.seed
        size = (ctx.cfg.model.height, ctx.cfg.model.width)
        sched = inference_schedule(ctx, size).to(ctx.device)
        noise = seed_noise(
            ctx.adapter.latent_shape(*size), [int(slot_rng(seed, CLASS_KEY, i).integers(2**62)) for i in range(n)]
        )
        self.keys = [ctx.feats.prompts[self.prompts_[i % len(self.prompts_)]] for i in range(n)]
        # each process samples every world-th image (an image depends on its index only), then all gather them
        mine = list(range(ctx.rank, n, ctx.world))
        network, out = ctx.adapter.network, []  # the unwrapped network (set up before the optimizer)
        with inference_mode(network):
            for start in range(0, len(mine), 16):
                idx = mine[start : start + 16]
                caption = ctx.contexts([self.keys[i] for i in idx])
                x = noise[idx].to(ctx.device, ctx.latent_dtype)
                out.append(sample_euler(ctx.velocity(network), x, sched, caption).float())
        local = torch.cat(out)
        if ctx.world == 1:
            self.pool = local.cpu()
            return
        per = -(-n // ctx.world)
        padded = torch.cat([local, local.new_zeros((per - len(local), *local.shape[1:]))])
        gathered = ctx.gather(padded).cpu()  # (world · per, …): each process's block in rank order
        pool = torch.empty((n, *local.shape[1:]))
        for rank in range(ctx.world):
            idx = list(range(rank, n, ctx.world))
            pool[idx] = gathered[rank * per : rank * per + len(idx)]
        self.pool = pool

    def __call__(self, ctx: StepContext, b: MicroBatch, scale: float, final: bool) -> dict[str, Any]:
        assert self.pool is not None, "ClassImagePrior.prepare did not run"
        dev, f32, m = ctx.device, ctx.latent_dtype, ctx.cfg.method
        picks = [int(r.integers(len(self.pool))) for r in b.rngs]
        gens = [torch_generator(r) for r in b.rngs]
        sigma = torch.cat([sample_training_sigmas(1, m.sft_timesteps, shift=m.sft_shift, generator=g) for g in gens])
        noise = torch.stack([torch.randn(self.pool.shape[1:], generator=g) for g in gens])
        with ctx.sync(final):
            loss = sft_loss(
                ctx.velocity(ctx.student),
                self.pool[picks].to(dev, f32),
                ctx.contexts([self.keys[j] for j in picks]),
                sigma.to(dev, f32),
                noise.to(dev, f32),
            )
            ctx.backward(loss * self.weight * scale)
        return {"class": float(loss.detach()) * self.weight}


class TeacherSampleFlowMatching(Term):
    """SFT on teacher samples (the D-OPSD paper's training-strategy ablation): the teacher (caption + target
    image, method.teacher weights) samples from fresh noise with the model's own few steps, no gradient; the
    caption-only student is trained with flow matching on that sample. Draws per sample: the teacher's noise,
    then SFT's σ and noise."""

    name, teacher = "sft_teacher", True

    def __call__(self, ctx: StepContext, b: MicroBatch, scale: float, final: bool) -> dict[str, Any]:
        dev, f32, m = ctx.device, ctx.latent_dtype, ctx.cfg.method
        gens = [torch_generator(r) for r in b.rngs]
        start = torch.stack([torch.randn(b.shape, generator=g) for g in gens])
        sigma = torch.cat([sample_training_sigmas(1, m.sft_timesteps, shift=m.sft_shift, generator=g) for g in gens])
        noise = torch.stack([torch.randn(b.shape, generator=g) for g in gens])
        assert ctx.teacher is not None, "the teacher's weights are set up for a term with teacher = True"
        teacher = ctx.teacher.wrap(ctx.velocity(ctx.network))
        t_ctx = ctx.contexts(teacher_keys(ctx, b))
        sample = sample_euler(teacher, start.to(dev, f32), inference_schedule(ctx, b.bucket).to(dev), t_ctx)
        with ctx.sync(final):
            loss = sft_loss(
                ctx.velocity(ctx.student),
                sample.detach(),
                ctx.contexts(student_keys(ctx, b)),
                sigma.to(dev, f32),
                noise.to(dev, f32),
            )
            ctx.backward(loss * scale)
        return {"sft_teacher": float(loss.detach())}
