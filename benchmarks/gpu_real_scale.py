"""Real-scale check on a CUDA GPU: step time and peak memory of SFT and D-OPSD on the full-size Z-Image-Turbo and
FLUX.2-klein-4B transformers, beside what `dopsd plan` predicts for the same settings.

    python benchmarks/gpu_real_scale.py                      # both models, bf16 and int8 bases, 3 steps each
    python benchmarks/gpu_real_scale.py --models zimage-turbo --quantize none --steps 2 --out zimage.json
    python benchmarks/gpu_real_scale.py --tiny               # tiny configs on the CPU (what the test runs)

Nothing is downloaded: each transformer is built from its bundled public config (dopsd/models/fullsize/) with
random weights, and the text / VLM / reference features are random tensors of the shapes the trainer feeds it
(so no encoder and no VAE is loaded). The settings are each preset's own: 1024², batch 1, LoRA rank 64 on the
family's default targets, gradient checkpointing, bf16 weights and autocast, AdamW, EMA teacher (D-OPSD's K-step
roll-out with per-step backward); `--quantize int8` stores the frozen base in int8 (dopsd.models.quantize). The steps
are dopsd's own losses (dopsd.core.objective) on the adapter's own velocity, LoRA injection and teacher swap.

Peak memory is measured from just before the first step (so it includes the optimizer state and, for D-OPSD, the
EMA copy of the LoRA) and compared with the planner's training peak minus the parts it counts that are not
loaded here (the VAE kept while training). Step time is the mean over the steps after one warm-up step.
Random weights make the losses meaningless; time and memory do not depend on the weights' values.
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

GiB = 2**30
MODELS = ("zimage-turbo", "flux2-klein-4b")
NOTE = (
    "random weights (no download); text/VLM/reference features are random tensors of the right shapes; "
    "no text encoder, VLM or VAE is loaded"
)


def config_for(preset: str, quantize: str, tiny: bool, folder: Path | None) -> Any:
    """The preset's config (its own 1024², rank 64, GC, bf16) or, with --tiny, the same on tiny configs."""
    from dopsd.config import load_config

    over = [f"model.quantize={quantize}", "train.batch_size=1", "train.gradient_checkpointing=true"]
    if tiny:
        assert folder is not None
        over += [f"model.pretrained={folder}", *TINY_OVERRIDES]
    return load_config(preset, over)


def randomize(obj: Any, device: torch.device, generator: torch.Generator) -> Any:
    """Contexts of the planner's shapes with random floats (ids kept), on the device."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            return torch.randn(obj.shape, generator=generator).to(device, obj.dtype)
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: randomize(v, device, generator) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(randomize(v, device, generator) for v in obj)
    return obj


def rollout_schedule(cfg: Any, spec: Any) -> torch.Tensor:
    """The trainer's roll-out schedule for this config (the adapter's inference schedule, every n-th σ)."""
    from dopsd.core.schedules import shifted_schedule, training_schedule

    m = cfg.model
    if m.family == "flux2":
        from dopsd.models.flux2_facts import STEPS, flux2_schedule

        _, h, w = spec.latent_shape(m.height, m.width)
        inference = flux2_schedule(m.inference_steps or STEPS, h * w)
    else:
        from dopsd.models.zimage import STEPS

        inference = shifted_schedule(m.inference_steps or STEPS, m.shift if m.shift is not None else 3.0)
    return training_schedule(inference, every=m.rollout_every)


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
    return {"sft": peaks["sft"]["peak"] / GiB, "dopsd": peaks["dopsd"]["peak"] / GiB, "kept": r.kept / GiB}


def run_method(
    method: str,
    net: torch.nn.Module,
    spec: Any,
    cfg: Any,
    trainable: dict[str, torch.nn.Parameter],
    device: torch.device,
    steps: int,
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
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-4)
    shadow = ParamShadow(trainable, "ema", 0.9999) if method == "dopsd" else None
    times, losses = [], []
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
        r = run_method(method, net, spec, cfg, trainable, device, args.steps)
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
            plan_seconds=round(plan_s, 1),
            build_seconds=round(build_s, 1),
            measured_over_predicted=(r["peak_allocated_gb"] / pred) if r["peak_allocated_gb"] else None,
        )
        rows.append(r)
        print(row_text(r), flush=True)
    del net, trainable
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


HEADER = (
    f"{'model':<16} {'base':<6} {'method':<6} {'step s':>8} {'peak alloc':>11} {'peak reserved':>14} "
    f"{'plan predicts':>14} {'alloc/plan':>11}"
)


def _gb(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f} GiB" if x >= 0.1 else f"{x * 1024:.2f} MiB"


def row_text(r: dict[str, Any]) -> str:
    ratio = "-" if r["measured_over_predicted"] is None else f"{r['measured_over_predicted']:.2f}"
    return (
        f"{r['preset']:<16} {r['base']:<6} {r['method']:<6} {r['step_seconds']:>8.2f} "
        f"{_gb(r['peak_allocated_gb']):>11} {_gb(r['peak_reserved_gb']):>14} {_gb(r['predicted_peak_gb']):>14} "
        f"{ratio:>11}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures, on the CPU")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per method (after one warm-up)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated presets among {', '.join(MODELS)}")
    parser.add_argument("--quantize", default="none,int8", help="comma-separated model.quantize values to run")
    parser.add_argument("--methods", default="sft,dopsd", help="comma-separated: sft, dopsd")
    parser.add_argument("--out", default="gpu_real_scale.json", help="JSON result file")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    quantize = [q for q in args.quantize.split(",") if q]
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

    for q in quantize:
        check_available(q, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (--tiny)"
    print(f"gpu_real_scale on {name}: {NOTE}", flush=True)
    print(
        f"predictions: dopsd plan's training peak minus the VAE it counts as kept (not loaded here); "
        f"step time: mean of {args.steps} step(s) after a warm-up",
        flush=True,
    )
    print(HEADER, flush=True)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.models:
            for q in quantize:
                rows.extend(run_model(preset, q, args, device, Path(tmp)))
    result = {
        "device": name,
        "tiny": args.tiny,
        "note": NOTE,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "runs": rows,
    }
    from dopsd.files import atomic_write_json

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out} ({result['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
