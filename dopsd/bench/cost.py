"""Cost of one optimizer step per method, measured side by side against SFT in the same process.

What is measured, and how (the report quotes this):
  * time: wall seconds of one whole optimizer step (zero_grad, loss, backward, optimizer step, teacher
    update), methods interleaved round-robin so that load from other processes hits all of them alike;
    the median over repeats, after warm-up steps. CUDA is synchronised around each step.
  * FLOPs: `torch.utils.flop_counter.FlopCounterMode` around (a) one whole step and (b) the network calls
    the algorithm is made of (student forward+backward, teacher forward). The *implied* count is the
    algorithm's formula over (b): D-OPSD = k·(student fwd+bwd + teacher fwd) + (K − k)·(student fwd) for the k of
    its K roll-out states it trains, SFT = 1 student fwd+bwd (`implied_flops`, which has the other methods).
    `overhead` = (time ratio to SFT) / (implied FLOP ratio to SFT): 1.0 means the step costs exactly what the
    algorithm implies; above 1, something beyond the algorithm's arithmetic (small-kernel overhead, the
    sequential roll-out, the teacher swap, Python) costs time.
  * memory: on CPU, tensor bytes resident at the step's start (unique storages of the weights, gradients,
    optimizer state and teacher copy) + the peak of bytes allocated during one step above that, from the
    torch profiler's allocation events (process RSS cannot separate methods that share a process). On CUDA,
    `torch.cuda.max_memory_allocated` over one step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch

from dopsd.planner.counting import count_flops, resident_bytes, state_tensors, transient_peak_bytes

StepFn = Callable[[], Any]

_MB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    steps: dict[str, StepFn], repeats: int, warmup: int = 2, device: str | torch.device = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each step function, interleaved round-robin (the fair comparison on a busy machine)."""
    if repeats < 1:
        raise ValueError(f"cost repeats must be >= 1, got {repeats}")
    dev = torch.device(device)
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            _sync(dev)
            start = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - start)
    return times


def peak_memory_bytes(
    fn: StepFn, resident: Iterable[torch.Tensor | None], device: str | torch.device = "cpu"
) -> tuple[int, int]:
    """(resident bytes at start, peak bytes during one call) — see the module docstring for the method."""
    dev = torch.device(device)
    held = resident_bytes(resident)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return held, held + torch.cuda.max_memory_allocated(dev) - start
    return held, held + transient_peak_bytes(fn)


@dataclass
class MethodCost:
    """One method's step cost; ratios are against the reference method (SFT) measured in the same run."""

    sec_per_step: float  # median wall seconds of one optimizer step
    sec_per_step_q25: float
    sec_per_step_q75: float
    repeats: int
    peak_mem_mb: float  # resident + transient peak (MiB)
    resident_mb: float
    flops_per_step: float  # counted over one whole step
    implied_flops: float  # the algorithm's formula over the counted network calls
    time_ratio: float = float("nan")  # sec_per_step / reference's
    flop_ratio: float = float("nan")  # implied_flops / reference's
    overhead: float = float("nan")  # time_ratio / flop_ratio (1.0 = exactly the algorithm's arithmetic)
    mem_ratio: float = float("nan")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class CostProbe:
    """What cost measurement needs from one method's training setup.

    step: one complete optimizer step. resident: tensors that live across steps (weights, grads, optimizer
    and teacher state). implied_flops: the algorithm's FLOPs from counted calls (see `implied_flops`).
    """

    step: StepFn
    resident: Callable[[], list[torch.Tensor]]
    implied_flops: float


def implied_flops(
    kind: str,
    student_fwd_bwd: float,
    teacher_fwd: float = 0.0,
    roll_out_steps: int = 1,
    student_fwd: float = 0.0,
    sample_steps: int = 0,
    trained_states: int | None = None,
    prior_share: float = 0.0,
    sft_weight: float = 0.0,
) -> float:
    """FLOPs the algorithm implies per optimizer step (K roll-out steps, S few-step sampling steps).

    sft: 1 student forward+backward on the batch. dopsd / offpolicy: K student forward+backward + K teacher
    forwards (one of the two velocities advances the roll-out, so no extra forward); trained at k < K of the
    states (`method.train_states`), k·(forward+backward + teacher forward) + (K − k) forwards without a graph
    (the states only rolled out: the student's, off-policy the teacher's). dreambooth: 2 student
    forward+backward (targets, class images). sft_teacher: S teacher forwards (its sample) + 1 forward+backward.
    pso: S student forwards (the reference sample) + 2 forward+backward (the pair) + 2 forwards (the frozen model
    on the pair, DPO form). hybrid: dopsd + 1 forward+backward (its SFT term) when `sft_weight` > 0.
    prior_share > 0 (prior preservation: `method.prior_batch_size` ÷ the batch): plus that share of D-OPSD's
    roll-out at the same states on caption-only contexts, whose teacher (the original weights) costs a student
    forward.
    """
    k = roll_out_steps if trained_states is None else min(trained_states, roll_out_steps)
    # prior preservation is a term of its own beside any method's (dopsd.methods.terms.terms_for)
    prior = prior_share * (k * (student_fwd_bwd + student_fwd) + (roll_out_steps - k) * student_fwd)
    if kind == "sft":
        own = student_fwd_bwd
    elif kind in ("dopsd", "offpolicy", "hybrid"):
        advance = teacher_fwd if kind == "offpolicy" else student_fwd  # who rolls the untrained states out
        sft = student_fwd_bwd if kind == "hybrid" and sft_weight > 0 else 0.0
        own = k * (student_fwd_bwd + teacher_fwd) + (roll_out_steps - k) * advance + sft
    elif kind == "dreambooth":
        own = 2 * student_fwd_bwd
    elif kind == "sft_teacher":
        own = sample_steps * teacher_fwd + student_fwd_bwd
    elif kind == "pso":
        own = sample_steps * student_fwd + 2 * student_fwd_bwd + 2 * student_fwd
    else:
        raise ValueError(
            f"implied FLOPs are defined for sft, dopsd, offpolicy, hybrid, dreambooth, sft_teacher and pso, got {kind!r}"
        )
    return float(own + prior)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def measure_costs(
    probes: dict[str, CostProbe],
    reference: str = "sft",
    repeats: int = 7,
    warmup: int = 2,
    device: str | torch.device = "cpu",
) -> dict[str, MethodCost]:
    """Time, FLOPs and peak memory of every probe, with ratios against `reference`, all in this one run."""
    if reference not in probes:
        raise ValueError(f"cost reference {reference!r} is not among the measured methods {sorted(probes)}")
    times = time_steps({k: p.step for k, p in probes.items()}, repeats=repeats, warmup=warmup, device=device)
    costs: dict[str, MethodCost] = {}
    for name, probe in probes.items():
        flops = count_flops(probe.step)
        held, peak = peak_memory_bytes(probe.step, probe.resident(), device=device)
        t = times[name]
        costs[name] = MethodCost(
            sec_per_step=statistics.median(t),
            sec_per_step_q25=_quantile(t, 0.25),
            sec_per_step_q75=_quantile(t, 0.75),
            repeats=len(t),
            peak_mem_mb=peak / _MB,
            resident_mb=held / _MB,
            flops_per_step=float(flops),
            implied_flops=float(probe.implied_flops),
        )
    ref = costs[reference]
    for cost in costs.values():
        cost.time_ratio = cost.sec_per_step / ref.sec_per_step
        cost.flop_ratio = cost.implied_flops / ref.implied_flops if ref.implied_flops else float("nan")
        cost.overhead = cost.time_ratio / cost.flop_ratio if cost.flop_ratio else float("nan")
        cost.mem_ratio = cost.peak_mem_mb / ref.peak_mem_mb if ref.peak_mem_mb else float("nan")
    return costs


__all__ = [
    "CostProbe",
    "MethodCost",
    "count_flops",
    "implied_flops",
    "measure_costs",
    "peak_memory_bytes",
    "resident_bytes",
    "state_tensors",
    "time_steps",
    "transient_peak_bytes",
]
