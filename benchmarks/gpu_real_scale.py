"""Real-scale check on a CUDA GPU: step time and peak memory of SFT and D-OPSD on the full-size Z-Image-Turbo and
FLUX.2-klein-4B transformers, with bf16, int8 and float8 bases, the learning invariants of the D-OPSD steps, and the
time and memory of the trainer's sampling (sample grid, few-step health), beside what `dopsd plan` predicts.

    python benchmarks/gpu_real_scale.py                      # both models; bases none, int8, float8; 3 steps each
    python benchmarks/gpu_real_scale.py --models zimage-turbo --quantize none --steps 2 --out zimage.json
    python benchmarks/gpu_real_scale.py --tiny               # tiny configs on the CPU (what the test runs)
    bash benchmarks/gpu_check.sh                             # on the lent GPU machine, as handed over (docs/gpu-check.md)

Nothing is downloaded: each transformer is built from its bundled public config (dopsd/models/fullsize/) with
random weights, and the text / VLM / reference features are random tensors of the shapes the trainer feeds it
(so no encoder is loaded; the VAE is built, with random weights, for sampling only). The settings are each
preset's own: 1024², batch 1, LoRA rank 64 on the family's default targets, gradient checkpointing, bf16 weights
and autocast, AdamW, EMA teacher (D-OPSD's K-step roll-out with per-step backward); `--quantize int8|float8` stores
the frozen base quantized (dopsd.models.quantize). The steps are dopsd's own losses (dopsd.core.objective) on the
adapter's own velocity, LoRA injection and teacher swap; the learning rate is 1e-3 (not the presets' 1e-4 / 2e-5)
so that after a few steps the student's LoRA differs from the EMA teacher's by more than bf16 rounding
(benchmarks/real_scale/invariants.py); time and memory do not depend on it.

Peak memory is measured from just before the first step (so it includes the optimizer state and, for D-OPSD, the
EMA copy of the LoRA) and compared with the planner's training peak minus the parts it counts that are not
loaded here (the VAE kept while training). Step time is the mean over the steps after one warm-up step. Sampling
(benchmarks/real_scale/sampling.py) is measured after training, on the trained network, once per base, beside the
planner's sampling parts (`predict_sampling`). Random weights make the losses meaningless; time and memory do not depend on the weights'
values. `--budget-s` stops starting new (model, base) runs after that many seconds; the JSON is written after
each run, so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from gpu_real_scale_tiny import TINY_OVERRIDES, write_tiny_folder
from real_scale.invariants import holds, velocity_checks, zero_grad_tensors
from real_scale.sampling import inference_schedule, randomize, run_sampling
from real_scale.table import HEADER, row_text, sampling_text, versions

GiB = 2**30
MODELS = ("zimage-turbo", "flux2-klein-4b")
NOTE = (
    "random weights (no download); text/VLM/reference features are random tensors of the right shapes; "
    "no text encoder or VLM is loaded (the VAE only for sampling)"
)


def config_for(preset: str, quantize: str, tiny: bool, folder: Path | None) -> Any:
    """The preset's config (its own 1024², rank 64, GC, bf16) or, with --tiny, the same on tiny configs."""
    from dopsd.config import load_config

    over = [f"model.quantize={quantize}", "train.batch_size=1", "train.gradient_checkpointing=true"]
    if tiny:
        assert folder is not None
        over += [f"model.pretrained={folder}", *TINY_OVERRIDES]
    return load_config(preset, over)


def rollout_schedule(cfg: Any, spec: Any) -> torch.Tensor:
    """The trainer's roll-out schedule for this config (the adapter's inference schedule, every n-th σ)."""
    from dopsd.core.schedules import training_schedule

    inference = inference_schedule(cfg, spec, cfg.model.height, cfg.model.width)
    return training_schedule(inference, every=cfg.model.rollout_every)


def build_network(spec: Any, device: torch.device) -> torch.nn.Module:
    """The full-size denoiser with random weights: built on the device in float32, then cast to the weights' dtype
    as loading a checkpoint with that dtype does (the float32 copy is gone before any measurement starts)."""
    with torch.device(device):
        net = spec.parts[spec.denoiser]({})
    net = net.to(spec.dtype)
    with torch.no_grad():
        for p in net.parameters():  # parameters a real checkpoint fills (e.g. pad tokens) may start uninitialised
            if not torch.isfinite(p).all():
                p.normal_(0.0, 0.02)
    return net


def family_skip(family: str) -> tuple[str, ...]:
    """The modules the family's adapter leaves unquantized (as the trainer does)."""
    from dopsd.models.registry import family_module

    return tuple(getattr(family_module(family), "QUANTIZE_SKIP", ()))


PLANNERS: dict[str, Any] = {}  # one per model: its measured phases serve every --quantize value


def predict(cfg: Any, spec: Any, quantize: str, preset: str) -> dict[str, float]:
    """`dopsd plan`'s training peaks (GiB) for SFT and D-OPSD, and the bytes of parts not loaded here."""
    from dopsd.planner.plan import Planner, choice_from_config

    if preset not in PLANNERS:
        PLANNERS[preset] = Planner(cfg, spec, "gpu", only=("rollout", "sft", "optim"))
    planner = PLANNERS[preset]
    c = choice_from_config(cfg, quantize)
    peaks, r = planner.peaks(c), planner.resident(c)
    return {
        "sft": peaks["sft"]["peak"] / GiB,
        "dopsd": peaks["dopsd"]["peak"] / GiB,
        "kept": r.kept / GiB,
        "frozen": r.frozen / GiB,
    }


def predict_sampling(cfg: Any, quantize: str, preset: str) -> dict[str, float] | str:
    """`dopsd plan`'s sampling parts (GiB beyond the resident tensors: grid and health forwards, decode), where the
    planner predicts sampling; compare with each measurement's peak_allocated_gb - resident_before_gb."""
    from dopsd.planner.plan import choice_from_config

    planner = PLANNERS[preset]
    if not hasattr(planner, "sampling_parts"):
        return "not modelled by this dopsd plan"
    parts = planner.sampling_parts(choice_from_config(cfg, quantize))
    return {k: (v if k.endswith("_batch") else v / GiB) for k, v in parts.items()}


def run_method(
    method: str,
    net: torch.nn.Module,
    spec: Any,
    cfg: Any,
    trainable: dict[str, torch.nn.Parameter],
    device: torch.device,
    steps: int,
    lr: float,
) -> dict[str, Any]:
    from dopsd.core.objective import dopsd_loss, sample_training_sigmas, sft_loss
    from dopsd.core.weights import ParamShadow

    h, w = cfg.model.height, cfg.model.width
    gen = torch.Generator().manual_seed(0)
    s_ctx = randomize(spec.student(h, w).context(1), device, gen)
    t_ctx = randomize(spec.teacher(h, w).context(1), device, gen)
    shape = (1, *spec.latent_shape(h, w))
    x0 = torch.randn(shape, generator=gen).to(device)
    noise = torch.randn(shape, generator=gen).to(device)
    schedule = rollout_schedule(cfg, spec)
    velocity = lambda x, s, c: spec.velocity(net, x, s, c)  # noqa: E731 - the adapter's own
    cuda = device.type == "cuda"
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if cuda and cfg.train.mixed_precision == "bf16"
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr)
    shadow = ParamShadow(trainable, "ema", 0.9999) if method == "dopsd" else None
    ema0 = {k: v.clone() for k, v in shadow.shadow.items()} if shadow is not None else {}
    times, losses, zero_counts = [], [], []
    for i in range(steps + 1):  # the first is a warm-up (optimizer state, kernel selection): not timed
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            if shadow is None:
                sigma = sample_training_sigmas(1, "logit_normal", generator=gen, device=device)
                loss = sft_loss(velocity, x0, s_ctx, sigma, noise)
                loss.backward()
            else:
                loss = dopsd_loss(
                    velocity,
                    shadow.wrap(velocity),
                    noise,
                    schedule.to(device),
                    s_ctx,
                    t_ctx,
                    backward=lambda l: l.backward(),
                ).loss
        optimizer.step()
        if shadow is not None:
            shadow.update()
        if cuda:
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        zero = zero_grad_tensors(trainable)
        zero_counts.append(len(zero))
    out: dict[str, Any] = {
        "method": method,
        "steps": steps,
        "step_seconds": sum(times) / len(times),
        "rollout_steps": len(schedule) - 1 if method == "dopsd" else None,
        "losses_finite": all(x == x and abs(x) != float("inf") for x in losses),
    }
    if cuda:
        out.update(
            resident_before_gb=before / GiB,
            peak_allocated_gb=torch.cuda.max_memory_allocated() / GiB,
            peak_reserved_gb=torch.cuda.max_memory_reserved() / GiB,
        )
    else:
        out.update(resident_before_gb=None, peak_allocated_gb=None, peak_reserved_gb=None)
    checks: dict[str, Any] = {"zero_grad_tensors_first_step": zero_counts[0], "zero_grad_tensors_last_step": len(zero)}
    checks["lora_tensors"] = len(trainable)
    if shadow is not None:
        checks.update(
            velocity_checks(velocity, shadow, trainable, noise, schedule[:1].to(device), s_ctx, autocast, ema0)
        )
        checks["holds"] = holds(checks, len(zero))
    else:
        checks["holds"] = len(zero) == 0
    out["invariants"] = checks
    del optimizer, shadow
    for p in trainable.values():
        p.grad = None
    return out


def run_model(preset: str, quantize: str, args: argparse.Namespace, device: torch.device, root: Path) -> list[dict]:
    from dopsd.core.weights import trainable_parameters
    from dopsd.lora.inject import add_lora
    from dopsd.models.quantize import quantize_network
    from dopsd.models.registry import plan_spec

    folder = write_tiny_folder(root, preset) if args.tiny else None
    cfg = config_for(preset, quantize, args.tiny, folder)
    spec = plan_spec(cfg.model, preset)
    t0 = time.perf_counter()
    predicted = predict(cfg, spec, quantize, preset)
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    net = build_network(spec, device)
    report = quantize_network(net, quantize, family_skip(cfg.model.family))
    torch.manual_seed(cfg.train.seed)
    add_lora(net, cfg.lora.targets or spec.lora_targets, cfg.lora.rank, cfg.lora.alpha)
    net.enable_gradient_checkpointing()
    net.train()
    trainable = trainable_parameters(net)
    for p in trainable.values():  # as the trainer: LoRA weights in float32 on a low-precision base
        p.data = p.data.float()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in net.parameters())
    rows = []
    for method in args.methods:
        r = run_method(method, net, spec, cfg, trainable, device, args.steps, args.lr)
        pred = predicted[method] - predicted["kept"]
        r.update(
            model=spec.label,
            preset=preset,
            base=quantize,
            resolution=[cfg.model.height, cfg.model.width],
            lora_rank=cfg.lora.rank,
            gradient_checkpointing=True,
            dtype=cfg.model.dtype,
            mixed_precision=cfg.train.mixed_precision,
            params=params,
            quantized_linears=report.quantized,
            predicted_peak_gb=pred,
            predicted_kept_gb=predicted["kept"],
            predicted_frozen_gb=predicted["frozen"],
            plan_seconds=round(plan_s, 1),
            build_seconds=round(build_s, 1),
            measured_over_predicted=(r["peak_allocated_gb"] / pred) if r["peak_allocated_gb"] else None,
        )
        rows.append(r)
        print(row_text(r), flush=True)
    if args.sampling:
        sampled = run_sampling(net, cfg, spec, device, full=quantize in args.full_sampling)
        sampled.update(
            model=spec.label, preset=preset, base=quantize, predicted=predict_sampling(cfg, quantize, preset)
        )
        for r in rows:
            r["sampling"] = sampled
        print(sampling_text(sampled), flush=True)
    del net, trainable
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures, on the CPU")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per method (after one warm-up)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated presets among {', '.join(MODELS)}")
    parser.add_argument(
        "--quantize",
        default=None,
        help="comma-separated model.quantize values (default none,int8,float8; --tiny: none,int8)",
    )
    parser.add_argument("--methods", default="sft,dopsd", help="comma-separated: sft, dopsd")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (see the module doc)")
    parser.add_argument("--no-sampling", dest="sampling", action="store_false", help="skip the sampling measurement")
    parser.add_argument(
        "--full-sampling",
        default="none",
        help="bases whose sampling also runs the control grid and the health check (comma-separated; the others "
        "sample the few-step grid only: the same batches, so the same peak memory, at a fraction of the time)",
    )
    parser.add_argument("--budget-s", type=float, default=0, help="start no new (model, base) run after this (0: none)")
    parser.add_argument("--out", default="gpu_real_scale.json", help="JSON result file")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    args.full_sampling = [q for q in args.full_sampling.split(",") if q]
    quantize = [q for q in (args.quantize or ("none,int8" if args.tiny else "none,int8,float8")).split(",") if q]
    bad = [m for m in args.models if m not in MODELS] + [m for m in args.methods if m not in ("sft", "dopsd")]
    if bad or args.steps < 1:
        parser.error(f"unknown --models/--methods {bad} or --steps < 1")
    if args.tiny:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("gpu_real_scale: no CUDA GPU here; run on a GPU machine, or with --tiny on the CPU", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    from dopsd.models.quantize import check_available

    unavailable = []
    for q in list(quantize):
        try:
            check_available(q, device)
        except Exception as err:  # noqa: BLE001 - e.g. float8 on a GPU without it: that base is skipped, said so
            if q == "none":
                raise
            quantize.remove(q)
            unavailable.append({"base": q, "why": str(err)})
            print(f"base {q} skipped: {err}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (--tiny)"
    ran = versions()
    print(f"gpu_real_scale on {name}: {NOTE}", flush=True)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in ran.items()), flush=True)
    print(
        f"predictions: dopsd plan's training peak minus the VAE it counts as kept (not loaded here); "
        f"step time: mean of {args.steps} step(s) after a warm-up; invariants: benchmarks/real_scale/invariants.py",
        flush=True,
    )
    print(HEADER, flush=True)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": name,
        "tiny": args.tiny,
        "note": NOTE,
        "versions": ran,
        "torch": torch.__version__,
    }
    result.update(runs=[], skipped=unavailable)
    from dopsd.files import atomic_write_json

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for q in quantize:  # bases outer: under --budget-s every model gets its bf16 run first
            for preset in args.models:
                if args.budget_s and time.perf_counter() - started > args.budget_s:
                    result["skipped"].append(
                        {"preset": preset, "base": q, "why": f"--budget-s {args.budget_s:g} spent"}
                    )
                    print(f"{preset:<16} {q:<6} skipped: --budget-s {args.budget_s:g} spent", flush=True)
                    continue
                result["runs"].extend(run_model(preset, q, args, device, Path(tmp)))
                result["seconds"] = round(time.perf_counter() - started, 1)
                atomic_write_json(out, result)  # after each run: a run cut short keeps what finished
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["invariants_hold"] = all(r["invariants"]["holds"] for r in result["runs"])
    atomic_write_json(out, result)
    print(
        f"wrote {out} ({result['seconds']} s); invariants {'hold' if result['invariants_hold'] else 'FAIL'}", flush=True
    )
    return 0 if result["invariants_hold"] else 1


if __name__ == "__main__":
    sys.exit(main())
