"""`plan(config)`: peak device memory and compute of a training run, predicted before anything is downloaded.

Peak of a method = resident bytes (dopsd.planner.resident) + its largest step phase (dopsd.planner.measure):
  sft          frozen + trainable + optimizer + kept + max(sft phase + dequant, grads + optim phase)
  dopsd        … + EMA shadow + max(grads + roll-out phase + dequant, grads + optim phase)
  dopsd_prior  … + prior shadow (when separate) + max(…, grads + prior phase + dequant)
where a quantized base adds one dequantized weight at a time to a forward, and to a student forward+backward
the dequantized weights it saves (int8/float8; dopsd.planner.resident). Feature caching runs before training
with its own peak (dopsd.planner.caching), sampling (grids, few-step health) between steps with its own
(dopsd.planner.sampling): resident + grads + max(sampler forward + dequant scratch, decode). The run peak is the
largest of the three; a run fits a card when it does with the CUDA context. Compute per optimizer step follows
the algorithm (K roll-out states, k of them trained: method.train_states, 0 = all K):
  SFT = S_fb;  D-OPSD = k·(S_fb + T_f) + (K−k)·S_f;  D-OPSD+prior = that + k·(S'_fb + S'_f) + (K−k)·S'_f
(× gradient accumulation), with S_fb a student forward+backward (it includes the recomputed forward under
gradient checkpointing), T_f a teacher forward, S_f a student forward without a graph (an untrained state only
advances the roll-out) and S'_f a forward with the caption-only context. Activation memory does not depend on
k: with per-step backward one state's graph is alive at a time either way.
`train.gradient_checkpointing: auto` is planned without checkpointing (a card fits when the run does without
it, or with it: auto turns it on there; dopsd.planner.auto).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from dopsd.config import ConfigError
from dopsd.models.registry import plan_spec
from dopsd.planner import sharded
from dopsd.planner.caching import caching_peaks
from dopsd.planner.fake import build_meta
from dopsd.planner.measure import PHASES, Phase, Setting, build_denoiser, full_depth_params, grad_input_linears, measure
from dopsd.planner.resident import QUANTIZE, GiB, Resident, count, module_bytes
from dopsd.planner.sampling import measure_sampling, sampler_batches
from dopsd.planner.search import CARDS, METHODS, fits, suggestions

UNSEEN = [
    "the CUDA context and the allocator's reserve (about 0.5-1 GiB; 1 GiB assumed when checking cards)",
    "allocator fragmentation (PyTorch's caching allocator typically reserves 5-15% above the live bytes)",
    "attention: modelled as a fused GPU kernel (flash / memory-efficient SDPA keeps q, k, v, the output and a "
    "per-row logsumexp, never the L x L scores); the CPU math path would materialise L x L",
    "mixed precision: CUDA autocast is emulated with CPU autocast (their op lists differ in a few ops)",
    "kernel workspaces (cuBLAS, cuDNN), NCCL buffers under several GPUs, and anything outside the trainer "
    "(other processes on the card)",
    "several processes: the plan is for one GPU (DDP adds gradient-sized buckets; FSDP would shard weights)",
    "quantization (model.quantize): weights are counted at torchao's storage size (dopsd.planner.resident), "
    "plus one weight's dequantization at a time and the dequantized weights int8/float8 save for backward "
    "(measured on torchao's CPU layers; float8 is assumed to behave as int8)",
]


@dataclass
class Choice:
    """The settings a plan is for (from the config, or changed by the fit search)."""

    height: int
    width: int
    batch: int
    gradient_checkpointing: bool
    lora_rank: int | None
    eight_bit: bool
    quantize: str

    def label(self) -> str:
        lora = f"LoRA r{self.lora_rank}" if self.lora_rank else "full fine-tune"
        return (
            f"{self.height}x{self.width}, batch {self.batch}, {lora}, "
            f"{'GC' if self.gradient_checkpointing else 'no GC'}, "
            f"{'8-bit AdamW' if self.eight_bit else 'AdamW'}, base {self.quantize}"
        )


@dataclass
class Planner:
    """Measurements are cached per setting, so the fit search re-measures only what changes activations."""

    cfg: Any
    spec: Any
    target: str = "gpu"
    exact: bool | None = None
    phases: dict[Any, dict[str, Phase]] = field(default_factory=dict)
    residents: dict[Any, Resident] = field(default_factory=dict)
    sampled: dict[Any, dict[str, float]] = field(default_factory=dict)
    kept_bytes: int | None = None
    only: tuple[str, ...] | None = None  # measure only these phases (validation of one method)

    def supports_gc(self) -> bool:
        if not hasattr(self, "_gc"):
            net = build_meta(
                lambda: self.spec.parts[self.spec.denoiser]({k: 1 for k in self.spec.depth}), self.spec.dtype
            )
            self._gc = bool(getattr(net, "_supports_gradient_checkpointing", False))
        return self._gc

    def setting(self, c: Choice) -> Setting:
        cfg, lora = self.cfg, self.cfg.lora
        targets = lora.targets or self.spec.lora_targets
        return Setting(
            height=c.height,
            width=c.width,
            batch=c.batch,
            prior_batch=cfg.method.prior_batch_size,
            gradient_checkpointing=c.gradient_checkpointing,
            lora_rank=c.lora_rank,
            lora_alpha=lora.alpha,
            lora_targets=tuple(targets) if isinstance(targets, list) else targets,
            target=self.target,
            mixed_precision=cfg.train.mixed_precision,
            teacher=cfg.method.teacher,
        )

    def measured(self, c: Choice) -> dict[str, Phase]:
        # Activations are measured at the configured rank: a lower rank only shrinks the LoRA's own
        # intermediates, so reusing them for the search's lower ranks errs on the safe side.
        rank = c.lora_rank if c.lora_rank is None or self.cfg.lora.rank <= c.lora_rank else self.cfg.lora.rank
        key = (c.height, c.width, c.batch, c.gradient_checkpointing, rank, c.eight_bit)
        if key not in self.phases:
            s = self.setting(Choice(c.height, c.width, c.batch, c.gradient_checkpointing, rank, c.eight_bit, "none"))
            self.phases[key] = measure(self.spec, s, c.eight_bit, self.exact, self.only or PHASES)
        return self.phases[key]

    def resident(self, c: Choice) -> Resident:
        key = (c.lora_rank, c.eight_bit, c.quantize, c.gradient_checkpointing)
        if key not in self.residents:
            if self.kept_bytes is None:
                self.kept_bytes = sum(
                    module_bytes(build_meta(lambda p=p: self.spec.parts[p]({}), self.spec.dtype))
                    for p in self.spec.kept_while_training
                )
            net = build_denoiser(self.spec, self.setting(c), {})
            m = self.cfg.method
            prior_separate = m.teacher != "base"
            gc = c.gradient_checkpointing and self.supports_gc()
            saves = self.grad_linears(c) if c.quantize in ("int8", "float8") else None
            self.residents[key] = count(
                net, self.spec.dtype, c.quantize, c.eight_bit, m.teacher, prior_separate, self.kept_bytes, gc, saves
            )
        return self.residents[key]

    def grad_linears(self, c: Choice) -> set[str]:
        """Frozen Linear layers whose input needs a gradient in a student forward (dopsd.planner.measure)."""
        if not hasattr(self, "_grad_linears"):
            self._grad_linears = grad_input_linears(self.spec, self.setting(c))
        return self._grad_linears

    def peaks(self, c: Choice) -> dict[str, dict[str, float]]:
        """Peak bytes and their parts, per method."""
        r, ph = self.resident(c), self.measured(c)
        base = r.frozen + r.trainable + r.optimizer + r.kept
        g, scratch, saved = r.grads, r.quant_scratch, max(r.quant_scratch, r.dequant_saved)
        optim = g + ph["optim"].peak

        def get(name: str) -> float:  # the phase's peak with the dequantized weights of a quantized base
            if name not in ph:
                return float("nan")  # unmeasured
            p = ph[name]
            return max(p.peak + scratch, p.before_student + p.student_peak + saved)

        act = lambda name: ph[name].peak if name in ph else float("nan")  # noqa: E731 - unmeasured: NaN
        terms = {
            "sft": (base, max(get("sft"), optim), act("sft")),
            "dopsd": (base + r.ema, max(g + get("rollout"), optim), act("rollout")),
            "dopsd_prior": (
                base + r.ema + r.prior,
                max(g + get("rollout"), g + get("prior"), optim),
                max(act("rollout"), act("prior")),
            ),
        }
        return {
            name: {"peak": res + step, "resident": res, "step": step, "activations": a}
            for name, (res, step, a) in terms.items()
        }

    def sampling_parts(self, c: Choice) -> dict[str, float]:
        """Bytes beyond the resident tensors of the sampling phase's parts (dopsd.planner.sampling)."""
        rank = c.lora_rank if c.lora_rank is None or self.cfg.lora.rank <= c.lora_rank else self.cfg.lora.rank
        key = (c.height, c.width, rank)  # a lower rank reuses the configured one's, as `measured` does
        if key not in self.sampled:
            batches = sampler_batches(self.cfg, c.height, c.width)
            s = self.setting(Choice(c.height, c.width, 1, False, rank, False, "none"))
            parts = measure_sampling(self.spec, s, batches, self.exact)
            self.sampled[key] = {**parts, **{f"{k}_batch": float(v) for k, v in batches.items()}}
        return self.sampled[key]

    def sampling(self, c: Choice) -> dict[str, float]:
        """Peak bytes of the sampling phase per method: what training keeps on the device (the last step's
        gradients included) + the largest of its sampler forwards (+ one dequantized weight) and its decode."""
        r, parts, peaks = self.resident(c), self.sampling_parts(c), self.peaks(c)
        forward = max(parts[k] for k in ("grid", "health") if k in parts) + r.quant_scratch
        return {name: p["resident"] + r.grads + max(forward, parts["decode"]) for name, p in peaks.items()}


def choice_from_config(cfg: Any, quantize: str | None = None) -> Choice:
    q = quantize if quantize is not None else getattr(cfg.model, "quantize", None) or "none"
    if q not in QUANTIZE:
        raise ConfigError(f"model.quantize / --quantize must be one of {', '.join(QUANTIZE)}, got {q!r}")
    if q != "none" and not cfg.lora.enabled:
        raise ConfigError(
            f"a quantized frozen base ({q}) needs LoRA (lora.enabled=true): a full fine-tune trains, "
            "and so keeps unquantized, every weight"
        )
    return Choice(
        cfg.model.height,
        cfg.model.width,
        cfg.train.batch_size,
        cfg.train.gradient_checkpointing is True,  # auto: planned without it (see the module docstring)
        cfg.lora.rank if cfg.lora.enabled else None,
        cfg.optim.eight_bit,
        q,
    )


def compute(planner: Planner, c: Choice) -> dict[str, Any]:
    """FLOPs per optimizer step per method, and the formula they follow."""
    ph, k = planner.measured(c), planner.spec.rollout_steps
    accum = planner.cfg.train.gradient_accumulation
    sub = planner.cfg.method.train_states
    n = k if sub == 0 or sub >= k else sub  # trained states per roll-out
    r, p = ph["rollout"], ph["prior"]
    s_fb, t_f, s_f = r.flops - r.teacher_flops, r.teacher_flops, r.student_fwd_flops
    prior = p.flops
    per = {
        "sft": ph["sft"].flops * accum,
        "dopsd": (n * (s_fb + t_f) + (k - n) * s_f) * accum,
        "dopsd_prior": (n * (s_fb + t_f + prior) + (k - n) * (s_f + p.student_fwd_flops)) * accum,
    }
    t = lambda x: x / 1e12  # noqa: E731
    unit, div = next((u, d) for u, d in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)) if s_fb >= d or d == 1e6)
    f = lambda x: f"{x / div:.1f}"  # noqa: E731
    if n == k:
        head = f"D-OPSD/SFT = K*(S_fb + T_f)/S_fb = {k}*({f(s_fb)} + {f(t_f)})/{f(s_fb)}"
        prior_text = f"K*(S'_fb + S'_f) = {k}*{f(prior)}"
    else:
        head = (
            f"D-OPSD/SFT = (k*(S_fb + T_f) + (K-k)*S_f)/S_fb = ({n}*({f(s_fb)} + {f(t_f)}) + {k - n}*{f(s_f)})"
            f"/{f(s_fb)}"
        )
        prior_text = f"k*(S'_fb + S'_f) + (K-k)*S'_f = {n}*{f(prior)} + {k - n}*{f(p.student_fwd_flops)}"
    formula = (
        f"{head} = {per['dopsd'] / per['sft']:.2f}   ({unit}; S_fb: student forward+backward"
        f"{' incl. the recomputed forward' if c.gradient_checkpointing else ''}, T_f: teacher forward, "
        f"S_f: student forward, K={k} roll-out states"
        f"{f', k={n} trained (method.train_states)' if n < k else ''}; with prior preservation {prior_text} more"
        f"{f', x{accum} micro-batches' if accum > 1 else ''})"
    )
    return {
        "K": k,
        "trained_states": n,
        "student_fwd_bwd_tflops": t(s_fb),
        "student_fwd_tflops": t(r.student_fwd_flops),
        "teacher_fwd_tflops": t(t_f),
        "prior_state_tflops": t(prior),
        "per_step_tflops": {m: t(v) for m, v in per.items()},
        "ratio_dopsd_sft": per["dopsd"] / per["sft"],
        "ratio_dopsd_prior_sft": per["dopsd_prior"] / per["sft"],
        "formula": formula,
        "gradient_accumulation": accum,
    }


def plan(
    cfg: Any,
    quantize: str | None = None,
    target: str = "gpu",
    search: bool = True,
    exact: bool | None = None,
    hint: str | None = None,
) -> dict[str, Any]:
    """The full prediction for one config (see the module docstring); a dict ready for JSON."""
    started = time.time()
    try:
        spec = plan_spec(cfg.model, hint if hint is not None else f"{cfg.preset} {cfg.model.pretrained or ''}")
        c = choice_from_config(cfg, quantize)
        spec.latent_shape(c.height, c.width)
    except (ValueError, FileNotFoundError) as err:  # sizes the model cannot take, missing weights manifest, …
        raise ConfigError(str(err)) from err
    planner = Planner(cfg, spec, target, exact)
    auto = cfg.train.gradient_checkpointing == "auto"
    peaks = planner.peaks(c)
    other = Choice(c.height, c.width, c.batch, not c.gradient_checkpointing, c.lora_rank, c.eight_bit, c.quantize)
    other_peaks = planner.peaks(other) if planner.supports_gc() else None
    r = planner.resident(c)
    caching = caching_peaks(spec, c, target)
    sampling, sampled = planner.sampling(c), planner.sampling_parts(c)
    flops = compute(planner, c)
    methods: dict[str, Any] = {}
    fsdp = sharded.per_gpu(planner, c) if c.lora_rank is None else None  # train.fsdp over N GPUs
    for name in METHODS:
        p = peaks[name]
        needed = "latents" if name == "sft" else "teacher"
        cache_peak = max(s["peak"] for s in caching["stages"] if s["needed_by"] in ("student", needed))
        run_peak = max(p["peak"], cache_peak, sampling[name])
        ph = planner.measured(c)["rollout" if name != "sft" else "sft"]
        entry = {
            "peak_gb": p["peak"] / GiB,
            "run_peak_gb": run_peak / GiB,
            "caching_peak_gb": cache_peak / GiB,
            "sampling_peak_gb": sampling[name] / GiB,
            "tflops_per_step": flops["per_step_tflops"][name],
            "fits": {str(card): fits(run_peak, card) for card in CARDS},
            "breakdown_gb": {
                "frozen_weights": r.frozen / GiB,
                "trainable_weights": r.trainable / GiB,
                "gradients": r.grads / GiB,
                "optimizer_state": r.optimizer / GiB,
                "ema_teacher": (r.ema if name != "sft" else 0) / GiB,
                "prior_shadow": (r.prior if name == "dopsd_prior" else 0) / GiB,
                "kept_parts": r.kept / GiB,
                "step_peak_above_resident": p["step"] / GiB,
                "activations": p["activations"] / GiB,
                "dequant_scratch": r.quant_scratch / GiB,
                "dequant_saved_for_backward": r.dequant_saved / GiB,
            },
            "student_fwd_bwd_gb": ph.student_peak / GiB,
        }
        if name != "sft":
            entry["teacher_fwd_gb"] = ph.teacher_peak / GiB
        if fsdp is not None:
            entry["fsdp_run_peak_gb_per_gpu"] = {n: max(v, cache_peak) / GiB for n, v in fsdp[name].items()}
        if other_peaks is not None:
            key = "activations_without_gc_gb" if c.gradient_checkpointing else "activations_with_gc_gb"
            entry[key] = other_peaks[name]["activations"] / GiB
            entry["peak_" + key.replace("activations_", "")] = other_peaks[name]["peak"] / GiB
            if auto:  # a card fits without checkpointing, or with it (auto turns it on there)
                with_gc = max(other_peaks[name]["peak"], cache_peak, sampling[name])
                entry["fits"] = {str(card): fits(run_peak, card) or fits(with_gc, card) for card in CARDS}
                entry["auto_checkpointing_on"] = {str(card): not fits(run_peak, card) for card in CARDS}
        methods[name] = entry
    result = {
        "model": spec.label,
        "family": cfg.model.family,
        "resolution": [c.height, c.width],
        "batch": c.batch,
        "settings": {
            "lora_rank": c.lora_rank,
            "gradient_checkpointing": c.gradient_checkpointing,
            "gradient_checkpointing_auto": auto,
            "optimizer": "adamw8bit" if c.eight_bit else "adamw",
            "quantize": c.quantize,
            "dtype": cfg.model.dtype,
            "mixed_precision": cfg.train.mixed_precision,
            "teacher": cfg.method.teacher,
            "prior_batch": cfg.method.prior_batch_size,
            "target": target,
        },
        "params": {"denoiser": r.total_params, "trainable": r.trainable_params},
        "sequence": {
            "student": spec.student(c.height, c.width).tokens,
            "teacher": spec.teacher(c.height, c.width).tokens,
        },
        "methods": methods,
        "compute": flops,
        "caching": caching,
        "sampling": {
            "batches": {k[: -len("_batch")]: int(v) for k, v in sampled.items() if k.endswith("_batch")},
            "activations_gb": {k: v / GiB for k, v in sampled.items() if not k.endswith("_batch")},
            "held": "weights, the last step's gradients, optimizer state, shadows and the VAE",
        },
        "checks": [vars(x) for x in spec.checks(c.height, c.width)],
        "measured": measured_note(spec, planner.exact),
        "sources": spec.sources,
        "notes": spec.notes,
        "unseen": UNSEEN if target == "gpu" else [],
    }
    if search:
        result["suggestions"] = suggestions(planner, c, caching)
    result["seconds"] = round(time.time() - started, 1)
    return result


def measured_note(spec: Any, exact: bool | None) -> str:
    if exact or not spec.depth or full_depth_params(spec) < 100_000_000:
        return "every phase measured on the whole network"
    knobs = ", ".join(f"{k}={v}" for k, v in spec.depth.items())
    return (
        f"phases measured with 2 and 3 blocks of each repeated kind and extrapolated linearly to {knobs} "
        "(identical blocks save and compute the same); resident bytes counted on the full network"
    )
