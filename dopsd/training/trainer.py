"""The trainer: set-up, one optimizer step, and `Trainer.fit`, the training loop every caller uses (`dopsd train`,
`dopsd.train`, the bench), on accelerate: LoRA or full, one process, DDP or FSDP.

What a method computes on a micro-batch is dopsd.methods.terms; what the run shows while it trains (progress bar,
TensorBoard, sample grids, few-step health) is dopsd.training.monitor; the run folder's files are dopsd.runs.folder; saving and
restoring the trainer's state in checkpoints is dopsd.training.checkpoint.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate.utils import set_seed

from dopsd.config import Config, ConfigError
from dopsd.core.schedules import training_schedule
from dopsd.core.weights import ParamShadow, trainable_parameters
from dopsd.data.cache import FeatureCache, Features, build_features, default_cache_dir, model_fingerprint
from dopsd.data.dataset import BatchOrder, Example, distinct_captions
from dopsd.errors import TrainingFailed
from dopsd.lora.inject import add_lora
from dopsd.methods import terms as methods
from dopsd.models.quantize import check_available
from dopsd.models.registry import load_adapter, torch_dtype
from dopsd.runs import checkpoint as ckpt
from dopsd.runs import folder as rundir
from dopsd.training import checkpoint as trainer_checkpoint
from dopsd.training import continual, optim, sharding, speed
from dopsd.training.checkpoint import Resumed
from dopsd.training.monitor import Monitor, make_health
from dopsd.training.processes import accelerator, broadcast
from dopsd.training.summary import final_verdict, save_final, write_summary

StepCallback = Callable[["Trainer", dict[str, Any]], None]


class TrainingAborted(TrainingFailed, RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept (summary.json status "aborted")."""

    exit_code = 3


class TrainingUnhealthy(TrainingFailed, RuntimeError):
    """Training ran to the end but the model is broken (non-finite or exploded weights, broken few-step samples);
    summary.json says status "unhealthy" and names the last good checkpoint."""

    exit_code = 4


@dataclass
class Result:
    output_dir: Path
    steps: int  # optimizer steps reached (counting skipped ones)
    losses: list[float]  # loss per step, the whole trace (resumed runs included)
    weights: Path | None  # lora.safetensors or model.safetensors
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # full per-step records


class Trainer:
    """`Trainer(config, out, examples, adapter=None, resume=False)`, then `prepare()` (every check that needs the
    model), then `fit()`; `train_step()` alone is one optimizer step (the cost probes time it). What the loss terms
    see of it is dopsd.methods.step.StepContext; its resumable loop state is `state_dict()`."""

    def __init__(self, config: Config, out: Path, examples: list[Example], adapter: Any = None, resume: bool = False):
        self.started = time.time()
        self.cfg, self.out, self.examples, self.resume = config, out, examples, resume
        t = config.train
        self.acc = accelerator(t)
        self.main = self.acc.is_main_process
        self.world, self.rank, self.device = self.acc.num_processes, self.acc.process_index, self.acc.device
        self.sharded = sharding.wanted(config, self.world)  # train.fsdp: torch FSDP2 (dopsd.training.sharding)
        set_seed(t.seed)

        check_available(config.model.quantize, self.acc.device, config.lora.enabled)  # before anything loads

        self.dtype = torch_dtype(config.model.dtype)
        # Latents and roll-outs stay float32 whatever the weights' dtype (adapters cast inside `velocity`).
        self.latent_dtype = torch.float32
        self.adapter = adapter if adapter is not None else load_adapter(config.model, self.acc.device, self.dtype)
        self.m = config.model
        self.method = config.method
        self.terms = methods.terms_for(config.method)
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.nonfinite = 0
        self.last_health: dict[str, Any] | None = None  # the latest few-step health measurement, summarised
        self.resumed: Resumed | None = None  # what --resume found (set by `prepare`)
        self.replaced: str | None = None  # where --overwrite moved an earlier run (given to `fit`)

    # --- setup ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        cfg, adapter = self.cfg, self.adapter
        self.prompts = cfg.sample.prompts or distinct_captions(self.examples, cfg.sample.num_prompts)
        root = (
            None
            if not cfg.cache.enabled
            else Path(cfg.cache.dir).expanduser()
            if cfg.cache.dir
            else default_cache_dir()
        )
        self.cache = FeatureCache(root, model_fingerprint(cfg, adapter))
        editing = self.m.editing  # editing models need sources: sample the first training examples instead
        extra = list(self.method.prior_prompts) + [p for t in self.terms for p in t.prompts(self)]
        with self.acc.main_process_first():  # the main process computes and stores; the others find the files
            self.feats: Features = build_features(
                adapter,
                self.examples,
                cfg,
                self.cache,
                ([] if editing else self.prompts) + extra,
                need_latents=any(t.latents for t in self.terms),
                need_teacher=any(t.teacher for t in self.terms),
            )
        if editing:
            shown = range(min(len(self.examples), cfg.sample.num_prompts))
            self.prompts = [self.examples[i].captions[0] for i in shown]
            self.sample_keys = [self.feats.student[(i, 0)] for i in shown]
        else:
            self.sample_keys = [self.feats.prompts[p] for p in self.prompts]
        self.health = make_health(self)
        adapter.release_encoders()
        network = adapter.network
        self.init = continual.resolve(cfg)  # continual tuning: the earlier run's model is the start
        continued = self.init is not None and continual.apply(network, cfg, self.init, adapter.default_lora_targets())
        torch.manual_seed(cfg.train.seed)  # deterministic LoRA init (resume and every process agree)
        if cfg.lora.enabled and not continued:
            add_lora(
                network,
                cfg.lora.targets or adapter.default_lora_targets(),
                cfg.lora.rank,
                cfg.lora.alpha,
                cfg.lora.dropout,
            )
        elif not cfg.lora.enabled:
            network.requires_grad_(True)
        self.speed = speed.setup(network, cfg.train, self.device)  # gradient checkpointing, torch.compile
        network.train()
        self.trainable = trainable_parameters(network)
        self.master_dtypes = sharding.float32_masters(network, self.trainable, cfg, self.acc)
        if not self.trainable:
            raise ConfigError("nothing to train: no parameter requires a gradient (check lora.targets)")
        self.start_max_abs = ckpt.weights_verdict(self.trainable, 0.0)["max_abs"] or 0.0
        self.global_batch = cfg.train.batch_size * self.world * cfg.train.gradient_accumulation
        self.dataset = ckpt.dataset_identity(self.examples)  # what a checkpoint must be resumed on
        if self.health is not None:
            self.health.reference(network)  # the starting model (LoRA at zero), before any step or resume
        for term in self.terms:  # with the starting model, before a resumed run loads its checkpoint
            term.prepare(self)
        if self.sharded:  # after the terms' own forwards; the shadows and the optimizer hold the shards
            sharding.shard(network, adapter, self.m.family, self.acc.device)
            self.trainable = trainable_parameters(network)
        self.teacher = None
        if any(t.teacher for t in self.terms):
            self.teacher = ParamShadow(self.trainable, self.method.teacher, self.method.ema_decay)
        self.prior = None
        if any(t.prior for t in self.terms):
            same = self.teacher is not None and self.teacher.mode == "base"
            self.prior = self.teacher if same else ParamShadow(self.trainable, "base")
        optimizer, self.scheduler = optim.build(list(self.trainable.values()), cfg)
        if self.sharded:  # FSDP is the parallelism: accelerate must not wrap the network in DDP as well
            self.student, self.optimizer = network, self.acc.prepare(optimizer)
        else:
            self.student, self.optimizer = self.acc.prepare(network, optimizer)
        self.network = network  # unwrapped: teacher forwards, sampling, saving
        self.order = BatchOrder(self.examples, cfg.train.seed)
        self.schedules: dict[tuple[int, int], torch.Tensor] = {}
        if self.resume:
            self.resumed = trainer_checkpoint.restore(self)

    def state_dict(self) -> dict[str, Any]:
        """The loop's resumable state, saved in each checkpoint beside the other stateful parts' (weights, shadows,
        optimizer, scheduler, RNG: dopsd.training.checkpoint)."""
        return {
            "step": self.step,
            "order": self.order.state_dict(),
            "history": self.history,
            "nonfinite": self.nonfinite,
            "health": self.last_health,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.history, self.nonfinite = state["step"], state["history"], state["nonfinite"]
        self.order.load_state_dict(state["order"])
        self.last_health = state.get("health")

    def schedule(self, bucket: tuple[int, int]) -> torch.Tensor:
        if bucket not in self.schedules:
            inference = self.adapter.inference_schedule(bucket[0], bucket[1], self.m.inference_steps)
            self.schedules[bucket] = training_schedule(inference, every=self.m.rollout_every)
        return self.schedules[bucket]

    def weights_verdict(self) -> dict[str, Any]:
        """Finite and not exploded (vs. the start): what a checkpoint and the final verdict record. Sharded: a
        collective (every process calls it)."""
        if self.sharded:
            return sharding.weights_verdict(self.trainable, self.start_max_abs)
        return ckpt.weights_verdict(self.trainable, self.start_max_abs)

    # --- one optimizer step -----------------------------------------------------------------------
    def sync(self, final: bool) -> contextlib.AbstractContextManager:
        """DDP: gradients are all-reduced only on the last backward of an optimizer step. FSDP reduce-scatters
        every backward: skipping it would keep whole gradients on every process."""
        plain = final or self.world == 1 or self.sharded
        return contextlib.nullcontext() if plain else self.acc.no_sync(self.student)

    def contexts(self, keys: list[str]) -> Any:
        """Cached contexts by key, on the device and collated into one batch."""
        return self.adapter.collate([{k: v.to(self.device) for k, v in self.feats.load(key).items()} for key in keys])

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(tensor)

    def velocity(self, network: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
        return lambda x, s, c: self.adapter.velocity(network, x, s, c)

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
                b = methods.micro_batch(self, step, m, [batch[s] for s in slots], slots)
                logs = methods.micro_step(self, self.terms, b, m == accum - 1, 1.0 / accum)
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
        params = list(self.trainable.values())
        norm = sharding.clip_grad_norm_(params, limit) if self.sharded else self.acc.clip_grad_norm_(params, limit)
        record["grad_norm"] = float(norm) if norm is not None else float("nan")
        record["lr"] = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(record["loss"]) and (
            math.isfinite(record["grad_norm"]) or cfg.train.mixed_precision == "fp16"
        )
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
            if stats[0].loss != stats[0].loss:  # not trained this step (method.train_states): nothing to log
                continue
            record[f"rollout/step{k}_loss"] = float(np.mean([s.loss for s in stats]))
            record[f"rollout/step{k}_gap"] = float(np.mean([s.gap for s in stats]))
            record[f"rollout/step{k}_sigma"] = stats[0].sigma
        self.step += 1
        return record

    # --- the training loop ------------------------------------------------------------------------
    def broadcast(self, value: Any) -> Any:
        """The main process's `value` on every process (a decision only the main process can make)."""
        return broadcast(value, self.world)

    def checkpoint(self, monitor: Monitor) -> None:
        """A checkpoint of this step. Its few-step health is measured first when no sampling interval measured this
        step, so that a checkpoint is called good only when a measurement says so (dopsd.training.checkpoint)."""
        if (self.last_health or {}).get("step") != self.step:
            self.last_health = monitor.check_health() or self.last_health
        trainer_checkpoint.save(self)
        monitor.checkpointed()

    def sample(self, monitor: Monitor, tag: str) -> None:
        """Sample grids of the network now, and its few-step health when measured (dopsd.training.monitor)."""
        self.last_health = monitor.sample(tag) or self.last_health

    def fit(self, callback: StepCallback | None = None, replaced: str | None = None) -> Result:
        """Train to train.max_steps in the claimed run folder (dopsd.runs.lock), then write the final weights and
        summary.json. `callback(trainer, record)` runs on every process after each optimizer step; `record` is
        the step's record (as in losses.jsonl) plus `seconds`, the step's own wall time. Raises TrainingAborted
        (too many non-finite steps in a row) or TrainingUnhealthy (a broken model) after writing the summary.
        `replaced`: where --overwrite moved an earlier run (summary.json says so)."""
        cfg, out, main = self.cfg, self.out, self.main
        self.replaced = replaced
        # --- the run folder: this session's config, and what the resumed checkpoint said about itself
        if main:
            rundir.write_config(out, cfg.to_yaml())
            for note in self.resumed.notes if self.resumed else []:
                warnings.warn(f"--resume: {note}")
        self.acc.wait_for_everyone()
        monitor = Monitor(self)
        self.first_step, self.loop_seconds = self.step, 0.0
        try:
            try:
                # --- samples (and health) of the starting model
                if self.step == 0:
                    self.sample(monitor, "step-0000000")
                every, ck = cfg.sample.every, cfg.train.checkpoint_every
                t0 = time.time()
                while self.step < cfg.train.max_steps and not monitor.done.stopped:  # or done (train.stop_when_done)
                    monitor.stop.check()  # Ctrl-C, SIGTERM: the last step is done; checkpoint it and exit
                    # --- one optimizer step, logged
                    started = time.perf_counter()
                    record = self.train_step()
                    seconds = time.perf_counter() - started
                    self.history.append({k: v for k, v in record.items() if not k.startswith("rollout/")})
                    self.loop_seconds = time.time() - t0
                    if callback is not None:
                        callback(self, {**record, "seconds": seconds})
                    monitor.step(record)
                    # --- a non-finite step was skipped: abort after too many in a row, never checkpoint in a streak
                    if record["skipped"]:
                        self._nonfinite(record)
                        continue
                    # --- interval samples first, so that the checkpoint of the same step records their health
                    done = self.step == cfg.train.max_steps
                    if every and self.step % every == 0 and not done and not monitor.stop.signum:
                        self.sample(monitor, f"step-{self.step:07d}")
                    if (ck and self.step % ck == 0) or done or monitor.done.stopped:
                        self.checkpoint(monitor)
                monitor.stop.check()
                self.acc.wait_for_everyone()
                self.loop_seconds = time.time() - t0
                # --- final samples and health; the final checkpoint learns the final health
                self.sample(monitor, "final")
                trainer_checkpoint.amend_health(self)
            finally:
                monitor.close()
        except TrainingAborted as err:
            if main:
                write_summary(self, monitor, rundir.STATUS_ABORTED, str(err), None)
            raise
        # --- the verdict, final weights and summary (the main process: only it measured the final health)
        weights, failure, summary = None, None, {}
        verdict = self.weights_verdict()  # every process: the verdict and whole weights of a sharded model are
        state = sharding.final_state(self) if verdict["ok"] else None  # collectives
        if main:
            status, problem = final_verdict(monitor.latest, verdict)
            weights = save_final(self, state) if verdict["ok"] else None
            summary = write_summary(self, monitor, status, problem, weights)
            print(rundir.format_summary(summary))
            if status != rundir.STATUS_OK:
                kept = f"the final weights are in {weights}" if weights else "no final weights were written"
                good = summary["last_good_checkpoint"] or "none"
                failure = (
                    f"training finished but the model is broken: {problem}. {out / rundir.SUMMARY} records "
                    f"status '{status}'; {kept}; last good checkpoint: {good}. "
                    f"Lower optim.lr (now {cfg.optim.lr:g}) and start again (--overwrite moves this run aside)"
                )
        failure = self.broadcast(failure)
        self.acc.wait_for_everyone()
        if failure is not None:
            raise TrainingUnhealthy(failure)
        return Result(out, self.step, [r["loss"] for r in self.history], weights, summary, self.history)

    def _nonfinite(self, record: dict[str, Any]) -> None:
        msg = (
            f"step {self.step}: non-finite loss or gradient (loss {record['loss']}, grad norm "
            f"{record['grad_norm']}); step skipped ({self.nonfinite} in a row)"
        )
        if self.main:
            warnings.warn(msg)
        if self.nonfinite >= self.cfg.train.max_nonfinite:
            good = ckpt.last_good(self.out / rundir.CHECKPOINTS)
            raise TrainingAborted(
                f"{self.nonfinite} non-finite steps in a row (train.max_nonfinite); training stopped at step "
                f"{self.step}. Last good checkpoint: {good or 'none'}. Lower optim.lr or check the data."
            )
