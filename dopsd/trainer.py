"""The training loop on accelerate: D-OPSD / SFT / hybrid, LoRA or full, one process, DDP or FSDP.

Determinism: every random choice of a sample (caption variant, caption dropout, noise, SFT σ, prior prompt)
comes from a generator seeded by (seed, step, slot in the global batch). The data order is a seeded
per-bucket permutation. So a run resumed from a checkpoint, or split across processes, draws exactly
what the uninterrupted single-process run drew.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from dopsd import checkpoint as ckpt
from dopsd.cache import DROPPED, FeatureCache, Features, build_features, default_cache_dir, model_fingerprint
from dopsd.config import Config, ConfigError
from dopsd.data.dataset import BatchOrder, Example, distinct_captions
from dopsd.errors import CheckpointError, TrainingFailed
from dopsd.files import atomic_save_image
from dopsd.lora.inject import add_lora
from dopsd.objective import dopsd_loss, sample_training_sigmas, sft_loss, step_weights_for
from dopsd.sampler import generate, seed_noise
from dopsd.images import grid_image
from dopsd.schedules import training_schedule
from dopsd.weights import ParamShadow, trainable_parameters


class TrainingAborted(TrainingFailed, RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept (summary.json status "aborted")."""

    exit_code = 3


class TrainingUnhealthy(TrainingFailed, RuntimeError):
    """Training ran to the end but the model is broken (non-finite or exploded weights, broken few-step samples);
    summary.json says status "unhealthy" and names the last good checkpoint."""

    exit_code = 4


def lr_factor(step: int, cfg: Config) -> float:
    """Warm-up then constant or cosine, as a factor of optim.lr for the 0-based optimizer step."""
    o, total = cfg.optim, cfg.train.max_steps
    warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
    if o.schedule == "constant":
        return warm
    p = min(1.0, max(0.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps)))
    return warm * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def _torch_gen(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


class Trainer:
    def __init__(self, config: Config, out: Path, examples: list[Example], adapter: Any = None, resume: bool = False):
        self.cfg, self.out, self.examples, self.resume = config, out, examples, resume
        t = config.train
        kwargs: dict[str, Any] = {"mixed_precision": t.mixed_precision, "cpu": t.device == "cpu"}
        if t.fsdp and (t.device == "cpu" or not torch.cuda.is_available()):
            raise ConfigError("train.fsdp is set but this run would be on the CPU: FSDP shards models across GPUs "
                              "and is not run on the CPU; on the CPU leave train.fsdp empty (plain DDP)")
        if t.fsdp:  # passed through to accelerate
            from accelerate import FullyShardedDataParallelPlugin

            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**t.fsdp)
        self.acc = Accelerator(**kwargs, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
        self.main = self.acc.is_main_process
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        set_seed(t.seed)
        from dopsd.models.registry import load_adapter, torch_dtype

        self.dtype = torch_dtype(config.model.dtype)
        # Latents and roll-outs stay float32 whatever the weights' dtype (adapters cast inside `velocity`).
        self.latent_dtype = torch.float32
        self.adapter = adapter if adapter is not None else load_adapter(config.model, self.acc.device, self.dtype)
        self.m = config.model
        self.method = config.method
        self.uses_teacher = self.method.name in ("dopsd", "hybrid")
        self.uses_sft = self.method.name in ("sft", "hybrid")
        self.prior_on = self.method.prior_weight > 0 and bool(self.method.prior_prompts)
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.nonfinite = 0
        self.started = time.time()
        self.last_health: dict[str, Any] | None = None  # the latest few-step health measurement, summarised
        self.resume_notes: list[str] = []

    # --- setup ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        cfg, adapter = self.cfg, self.adapter
        self.prompts = cfg.sample.prompts or distinct_captions(self.examples, cfg.sample.num_prompts)
        root = None if not cfg.cache.enabled else Path(cfg.cache.dir).expanduser() if cfg.cache.dir else default_cache_dir()
        self.cache = FeatureCache(root, model_fingerprint(cfg, adapter))
        editing = self.m.editing  # editing models need sources: sample the first training examples instead
        with self.acc.main_process_first():  # the main process computes and stores; the others find the files
            self.feats: Features = build_features(
                adapter, self.examples, cfg, self.cache, ([] if editing else self.prompts) + list(self.method.prior_prompts),
                need_latents=self.uses_sft, need_teacher=self.uses_teacher,
            )
        if editing:
            shown = range(min(len(self.examples), cfg.sample.num_prompts))
            self.prompts = [self.examples[i].captions[0] for i in shown]
            self.sample_keys = [self.feats.student[(i, 0)] for i in shown]
        else:
            self.sample_keys = [self.feats.prompts[p] for p in self.prompts]
        self.health = self._make_health()
        adapter.release_encoders()
        network = adapter.network
        torch.manual_seed(cfg.train.seed)  # deterministic LoRA init (resume and every process agree)
        if cfg.lora.enabled:
            add_lora(network, cfg.lora.targets or adapter.default_lora_targets(), cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
        else:
            network.requires_grad_(True)
        if cfg.train.gradient_checkpointing:
            if hasattr(network, "enable_gradient_checkpointing"):
                network.enable_gradient_checkpointing()
            else:
                warnings.warn(f"{type(network).__name__} has no gradient checkpointing; train.gradient_checkpointing ignored")
        network.train()
        self.trainable = trainable_parameters(network)
        if cfg.lora.enabled and self.dtype != torch.float32:
            for p in self.trainable.values():  # LoRA weights train in float32 on a low-precision base (peft casts)
                p.data = p.data.float()
        if not self.trainable:
            raise ConfigError("nothing to train: no parameter requires a gradient (check lora.targets)")
        self.start_max_abs = ckpt.weights_verdict(self.trainable, 0.0)["max_abs"] or 0.0
        self.global_batch = cfg.train.batch_size * self.world * cfg.train.gradient_accumulation
        self.dataset = ckpt.dataset_identity(self.examples)  # what a checkpoint must be resumed on
        if self.health is not None:
            self.health.reference(network)  # the starting model (LoRA at zero), before any step or resume
        self.teacher = ParamShadow(self.trainable, self.method.teacher, self.method.ema_decay) if self.uses_teacher else None
        self.prior = None
        if self.prior_on:
            same = self.teacher is not None and self.teacher.mode == "base"
            self.prior = self.teacher if same else ParamShadow(self.trainable, "base")
        optimizer = self._optimizer(list(self.trainable.values()))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        self.student, self.optimizer = self.acc.prepare(network, optimizer)
        self.network = network  # unwrapped: teacher forwards, sampling, saving
        self.order = BatchOrder(self.examples, cfg.train.seed)
        self.schedules: dict[tuple[int, int], torch.Tensor] = {}
        if self.resume:
            self._load_checkpoint()

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        if not o.eight_bit:
            return torch.optim.AdamW(params, **kw)
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError as err:
            raise ConfigError("optim.eight_bit needs bitsandbytes (pip install bitsandbytes; CUDA only), "
                              "or set optim.eight_bit=false") from err
        return bnb.optim.AdamW8bit(params, **kw)

    def _make_health(self) -> Any:
        if not (self.cfg.sample.health and self.main) or self.m.editing:
            return None
        try:
            from dopsd.health import FewStepHealth
        except ImportError:
            return None
        s, m = self.cfg.sample, self.m
        prompts = s.health_prompts or self.cfg.method.prior_prompts[:4] or self.prompts[:4]
        return FewStepHealth(self.adapter, prompts, height=m.height, width=m.width, seeds=tuple(s.seeds[:2]),
                             steps=m.inference_steps, control_steps=s.control_steps, device=self.acc.device)

    def schedule(self, bucket: tuple[int, int]) -> torch.Tensor:
        if bucket not in self.schedules:
            inference = self.adapter.inference_schedule(bucket[0], bucket[1], self.m.inference_steps)
            self.schedules[bucket] = training_schedule(inference, every=self.m.rollout_every)
        return self.schedules[bucket]

    # --- checkpoints ------------------------------------------------------------------------------
    @staticmethod
    def _shadow(s: ParamShadow | None) -> dict[str, Any] | None:
        return None if s is None else {"mode": s.mode, "decay": s.decay, "shadow": s.shadow}

    def weights_verdict(self) -> dict[str, Any]:
        return ckpt.weights_verdict(self.trainable, self.start_max_abs)

    def save_checkpoint(self) -> None:
        root = self.out / "checkpoints"
        ckpt.write_rank_rng(root, self.step, self.rank)
        self.acc.wait_for_everyone()
        if self.main:
            prior = self.prior if (self.prior is not self.teacher and self.cfg.lora.enabled) else None
            weights = self.weights_verdict()
            # Good = finite, sane weights and no broken few-step health at the latest measurement (if any).
            good = weights["ok"] and not (self.last_health or {}).get("broken")
            ckpt.write_main(
                root, self.step, trainable=self.trainable, teacher=self._shadow(self.teacher), prior=self._shadow(prior),
                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                state={"step": self.step, "order": self.order.state_dict(), "history": self.history,
                       "nonfinite": self.nonfinite, "processes": self.world, "global_batch": self.global_batch,
                       "dataset": self.dataset, "good": good, "weights": weights,
                       "health": self.last_health},
            )
            ckpt.finalise(root, self.step, self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()

    def amend_checkpoint_health(self) -> None:
        """Health measured after the checkpoint of the same step was written (the final one): record it there."""
        path = ckpt.checkpoint_dir(self.out / "checkpoints", self.step)
        if self.main and self.last_health and self.last_health["step"] == self.step and path.is_dir():
            ckpt.amend(path, health=self.last_health, broken=bool(self.last_health.get("broken")))

    def _load_checkpoint(self) -> None:
        root = self.out / "checkpoints"
        path, data, notes = ckpt.load_for_resume(root, self.rank, self.acc.device)
        notes += ckpt.check_fits(path, data["state"], dataset=self.dataset,
                                 processes=self.world, global_batch=self.global_batch)
        if not data["state"].get("good", True):
            why = (data["state"].get("weights") or {}).get("problem") or "its few-step health was broken"
            notes.append(f"{path} was not a good checkpoint when written ({why}); the last good one is "
                         f"{ckpt.last_good(root) or 'none'}")
        if set(data["trainable"]) != set(self.trainable):
            raise CheckpointError(f"{path} does not match the model's trainable weights (lora.targets or the model "
                                  "changed?); resume with the run's settings")
        self.checkpoints_seen = [p.name for p in ckpt.list_checkpoints(root)]
        self.resume_notes = notes
        self.last_health = data["state"].get("health")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(data["trainable"][name])
        for shadow, saved in ((self.teacher, data["teacher"]), (self.prior, data["prior"])):
            if shadow is not None and saved is not None and shadow.mode != "live":
                shadow.load_state_dict(saved)
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        ckpt.set_rng_state(data["rng"])
        state = data["state"]
        self.step, self.history, self.nonfinite = state["step"], state["history"], state["nonfinite"]
        self.order.load_state_dict(state["order"])
        self.resumed_from = str(path)

    # --- one optimizer step -----------------------------------------------------------------------
    def _sync(self, final: bool) -> contextlib.AbstractContextManager:
        """DDP: gradients are all-reduced only on the last backward of an optimizer step."""
        return contextlib.nullcontext() if final or self.world == 1 else self.acc.no_sync(self.student)

    def _contexts(self, keys: list[str]) -> Any:
        dev = self.acc.device
        return self.adapter.collate([{k: v.to(dev) for k, v in self.feats.load(key).items()} for key in keys])

    def _velocity(self, network: torch.nn.Module):
        return lambda x, s, c: self.adapter.velocity(network, x, s, c)

    def _rollout_term(self, s_ctx: Any, t_ctx: Any, teacher: ParamShadow, noise: torch.Tensor, sched: torch.Tensor,
                      weight: float, final: bool) -> Any:
        """One D-OPSD-form loss (per-step backward by default); DDP syncs only on the step's very last backward."""
        dev, per_step = self.acc.device, self.method.per_step_backward
        teacher_fn = teacher.wrap(self._velocity(self.network))
        out = dopsd_loss(
            self._velocity(self.student), teacher_fn, noise.to(dev, self.latent_dtype), sched.to(dev), s_ctx, t_ctx,
            space=self.method.loss_space, step_weights=step_weights_for(self.method.step_weighting, sched),
            backward=(lambda loss: self.acc.backward(loss * weight)) if per_step else None,
            step_context=lambda last: self._sync(final and last),
        )
        if not per_step:
            self.acc.backward(out.loss * weight)  # DDP sync was decided by the last forward's context
        return out

    def micro_step(self, step: int, micro: int, indices: list[int], slots: list[int], final_micro: bool,
                   scale: float) -> dict[str, Any]:
        """Forward + backward of every loss term for this process's part of one micro-batch."""
        cfg, dev, f32 = self.cfg, self.acc.device, self.latent_dtype
        bucket = self.examples[indices[0]].bucket
        shape = self.adapter.latent_shape(*bucket)
        rngs = [_rng(cfg.train.seed, step, slot) for slot in slots]  # per-sample randomness, by global slot
        variants = []
        for i, r in zip(indices, rngs):
            c = int(r.integers(len(self.examples[i].captions)))
            variants.append(DROPPED if r.random() < cfg.data.caption_dropout else c)
        student_keys = [self.feats.student[(i, v)] for i, v in zip(indices, variants)]
        terms = [t for t, on in (("dopsd", self.uses_teacher), ("sft", self.uses_sft), ("prior", self.prior_on)) if on]
        logs: dict[str, Any] = {}
        for term in terms:
            final = final_micro and term == terms[-1]
            if term == "dopsd":  # the student's roll-out, matched to the teacher that also sees the target image
                noise = seed_noise(shape, [int(r.integers(2**62)) for r in rngs])
                t_ctx = self._contexts([self.feats.teacher[(i, v)] for i, v in zip(indices, variants)])
                out = self._rollout_term(self._contexts(student_keys), t_ctx, self.teacher, noise,
                                         self.schedule(bucket), scale, final)
                logs["dopsd"], logs["steps"] = float(out.loss.detach()), out.steps
            elif term == "prior":  # unrelated prompts: the original model, caption-only on both sides
                n = self.method.prior_batch_size
                base = (micro * self.world + self.rank) * n
                prng = [_rng(cfg.train.seed, step, slot, 1) for slot in range(base, base + n)]
                prompts = [self.method.prior_prompts[int(r.integers(len(self.method.prior_prompts)))] for r in prng]
                noise = seed_noise(self.adapter.latent_shape(self.m.height, self.m.width),
                                   [int(r.integers(2**62)) for r in prng])
                ctx = self._contexts([self.feats.prompts[p] for p in prompts])
                weight = self.method.prior_weight
                out = self._rollout_term(ctx, ctx, self.prior, noise, self.schedule((self.m.height, self.m.width)),
                                         weight * scale, final)
                logs["prior"] = float(out.loss.detach()) * weight
            else:  # SFT: flow matching on the target latents with the caption-only context
                gens = [_torch_gen(r) for r in rngs]
                sigma = torch.cat([sample_training_sigmas(1, self.method.sft_timesteps, shift=self.method.sft_shift,
                                                          generator=g) for g in gens])
                noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
                x0 = torch.stack([self.feats.load(self.feats.latents[i])["latents"] for i in indices])
                weight = 1.0 if self.method.name == "sft" else self.method.sft_weight
                with self._sync(final):
                    loss = sft_loss(self._velocity(self.student), x0.to(dev, f32), self._contexts(student_keys),
                                    sigma.to(dev, f32), noise.to(dev, f32))
                    self.acc.backward(loss * weight * scale)
                logs["sft"] = float(loss.detach()) * weight
        logs["loss"] = sum(v for k, v in logs.items() if k in ("dopsd", "sft", "prior"))
        return logs

    def train_step(self) -> dict[str, Any]:
        cfg, step = self.cfg, self.step
        bs, accum = cfg.train.batch_size, cfg.train.gradient_accumulation
        batch = self.order.next(step, bs * self.world * accum)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        diag: list[list[Any]] = []
        with self.acc.autocast():
            for m in range(accum):
                base = (m * self.world + self.rank) * bs
                slots = list(range(base, base + bs))
                logs = self.micro_step(step, m, [batch[s] for s in slots], slots, m == accum - 1, 1.0 / accum)
                for k, v in logs.items():
                    if k == "steps":
                        diag.append(v)
                    else:
                        totals[k] = totals.get(k, 0.0) + v / accum
        keys = sorted(totals)
        reduced = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.acc.device)
        if self.world > 1:
            reduced = self.acc.reduce(reduced, "mean")
        record: dict[str, Any] = {"step": step + 1, **{k: float(v) for k, v in zip(keys, reduced.tolist())}}
        limit = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = self.acc.clip_grad_norm_(list(self.trainable.values()), limit)
        record["grad_norm"] = float(norm) if norm is not None else float("nan")
        record["lr"] = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(record["loss"]) and (math.isfinite(record["grad_norm"]) or cfg.train.mixed_precision == "fp16")
        if finite:
            self.optimizer.step()
            if not self.acc.optimizer_step_was_skipped:  # fp16: the grad scaler may skip an overflowing step
                self.scheduler.step()
                if self.teacher is not None:
                    self.teacher.update()
            self.nonfinite = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite += 1
        record["skipped"] = not finite
        for k, stats in enumerate(zip(*diag) if diag else []):
            record[f"rollout/step{k}_loss"] = float(np.mean([s.loss for s in stats]))
            record[f"rollout/step{k}_gap"] = float(np.mean([s.gap for s in stats]))
            record[f"rollout/step{k}_sigma"] = stats[0].sigma
        self.step += 1
        return record

    # --- samples ----------------------------------------------------------------------------------
    def sample_grids(self, tag: str, writer: Any = None) -> dict[str, Any]:
        """Grids at the few-step setting and the many-step control (main process only)."""
        if not self.main:
            return {}
        # Sampling leaves the training RNG untouched, so a resumed run (which skips these samples) stays exact.
        with torch.random.fork_rng(devices=None if torch.cuda.is_available() else []):
            return self._sample_grids(tag, writer)

    def _sample_grids(self, tag: str, writer: Any) -> dict[str, Any]:
        s, m = self.cfg.sample, self.m
        seeds = list(s.seeds)
        contexts = [self.feats.load(key) for key in self.sample_keys for _ in seeds]
        noise = seed_noise(self.adapter.latent_shape(m.height, m.width), seeds * len(self.prompts))
        (self.out / "samples").mkdir(exist_ok=True)
        result: dict[str, Any] = {}
        for steps in [m.inference_steps] + ([s.control_steps] if s.control_steps > 0 else []):
            sched = self.adapter.inference_schedule(m.height, m.width, steps)
            steps = len(sched) - 1  # None = the model's own count
            with self.acc.autocast():
                images = generate(self.adapter, self.network, contexts, noise, sched, device=self.acc.device,
                                  dtype=self.latent_dtype)
            grid = grid_image(images, len(self.prompts), len(seeds))
            path = self.out / "samples" / f"{tag}_{steps}steps.png"
            atomic_save_image(path, grid)
            result[f"grid_{steps}"] = str(path)
            if writer is not None:
                writer.add_image(f"samples/{steps}steps", np.asarray(grid), self.step, dataformats="HWC")
        if self.health is not None:
            measured = self.health.measure(self.network)
            result["health"] = measured
            self.last_health = {"step": self.step, "health": measured["health"], "broken": measured["broken"],
                                "problem": measured["problem"]}
            if writer is not None:
                for k, v in self.health.scalars(measured).items():
                    writer.add_scalar(k, v, self.step)
            if measured.get("warning"):
                warnings.warn(f"step {self.step}: {measured['warning']}")
        return result
