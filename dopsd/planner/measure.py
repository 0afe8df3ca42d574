"""Measure one training step's phases on a fake full-size denoiser, with the trainer's own code.

A step of the trainer is a sequence of phases that each return to the step's baseline (the roll-out state is
detached after every per-step backward), so its peak is the baseline plus the largest phase:

  rollout  one D-OPSD roll-out state: teacher forward (no grad, teacher context) + student forward+backward,
           gradients already allocated (every state after the first); the ops of one iteration of
           `dopsd.core.objective.dopsd_loss` (which itself reads values, e.g. float(σ), that fake tensors lack)
  prior    the same with the caption-only context on both sides (prior preservation's batch)
  sft      one SFT forward+backward from no gradients (`dopsd.core.objective.sft_loss`)
  optim    gradient clipping, the optimizer step and the EMA update (`dopsd.core.weights.ParamShadow`)

Each phase's peak is the most bytes alive at once beyond the resident tensors (weights, gradients, shadows,
optimizer state), measured by `LiveBytes`; its FLOPs by torch's counter. Networks whose blocks repeat are
measured at depth 1 and with one more block of each kind, and extrapolated linearly to the full depth (exact
for identical blocks: every block saves and computes the same); small networks are measured at full depth.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch
from torch import nn

from dopsd.core.objective import sft_loss
from dopsd.core.weights import ParamShadow, trainable_parameters
from dopsd.lora.inject import add_lora
from dopsd.planner.fake import LiveBytes, build_meta, fused_attention, new_mode, to_fake

FULL_DEPTH_BELOW = 100_000_000  # parameters: smaller networks are measured whole, larger ones by depth


@dataclass(frozen=True)
class Setting:
    """Everything that changes a step's activations (resident bytes are computed separately)."""

    height: int
    width: int
    batch: int
    prior_batch: int
    gradient_checkpointing: bool
    lora_rank: int | None  # None: full fine-tune
    lora_alpha: float
    lora_targets: Any  # tuple of names or a regex string
    target: str  # "gpu" (fused attention, foreach AdamW) or "cpu" (CPU dispatch as it is)
    mixed_precision: str  # accelerate's: "no", "bf16", "fp16"
    teacher: str = "ema"

    def with_(self, **kw: Any) -> "Setting":
        return replace(self, **kw)


@dataclass
class Phase:
    peak: float  # bytes beyond the resident tensors
    flops: float
    teacher_peak: float = 0.0  # rollout/prior: the teacher forward alone (above what was alive before it)
    student_peak: float = 0.0  # rollout/prior/sft: the student forward+backward alone
    teacher_flops: float = 0.0
    student_fwd_flops: float = 0.0  # the student forward alone (its backward is flops − teacher − this)
    before_teacher: float = 0.0  # rollout/prior: bytes alive when the teacher forward starts (noise, contexts)
    before_student: float = 0.0  # … and when the student's starts (+ the teacher's output)


PHASES = ("rollout", "prior", "sft", "optim")


class Window(LiveBytes):
    """LiveBytes with sub-windows: the peak (above what was alive when it began) and FLOPs of a part."""

    @contextlib.contextmanager
    def window(self) -> Iterator[dict[str, float]]:
        out = {"peak": 0.0, "flops": 0.0}
        start, outer, flops = self.current, self.peak, self.flops
        self.peak = self.current
        try:
            yield out
        finally:
            out["peak"], out["flops"] = self.peak - start, self.flops - flops
            self.peak = max(outer, self.peak)


def prepare(network: nn.Module, setting: Setting) -> dict[str, nn.Parameter]:
    """The trainer's set-up (dopsd.training.trainer.Trainer.prepare): LoRA or full, checkpointing, train(), and
    float32 trained weights (dopsd.training.sharding.float32_masters: a full fine-tune's forwards under autocast)."""
    if setting.lora_rank is not None:
        targets = list(setting.lora_targets) if isinstance(setting.lora_targets, tuple) else setting.lora_targets
        add_lora(network, targets, setting.lora_rank, setting.lora_alpha)
    else:
        network.requires_grad_(True)
    if setting.gradient_checkpointing and hasattr(network, "enable_gradient_checkpointing"):
        network.enable_gradient_checkpointing()
    network.train()
    params = trainable_parameters(network)
    for p in params.values():
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    if setting.lora_rank is None and setting.mixed_precision != "no":
        forward = network.forward
        network.forward = lambda *args, **kwargs: _run_autocast(setting, forward, args, kwargs)
    return params


def _run_autocast(setting: Setting, forward: Any, args: tuple, kwargs: dict) -> Any:
    with _autocast(setting):
        return forward(*args, **kwargs)


def build_denoiser(spec: Any, setting: Setting, overrides: dict[str, int]) -> nn.Module:
    network = build_meta(lambda: spec.parts[spec.denoiser](overrides), spec.dtype)
    prepare(network, setting)
    return network


def _autocast(setting: Setting) -> contextlib.AbstractContextManager:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setting.mixed_precision)
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _optimizer(params: list[nn.Parameter], setting: Setting, eight_bit: bool) -> Any:
    if eight_bit:  # bitsandbytes' fused 8-bit kernel updates in place; its state is counted analytically
        return None
    return torch.optim.AdamW(params, lr=1e-4, foreach=True if setting.target == "gpu" else None)


def rollout_state(
    student: Any,
    teacher: Any,
    state: torch.Tensor,
    s_ctx: Any,
    t_ctx: Any,
    tr: Window,
    sigma: float = 1.0,
    next_sigma: float = 0.5,
    steps: int = 4,
) -> dict[str, float]:
    """One iteration of dopsd_loss's loop with per-step backward (x0-space loss), op for op (dopsd_loss itself
    reads values, e.g. float(σ), that fake tensors lack); the teacher and student parts measured apart. `state`
    is a roll-out state after the first (its own tensor; the caller still holds the initial noise)."""
    x = state.detach()
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
    before_teacher = tr.current
    with tr.window() as t_win, torch.no_grad():
        v_teacher = teacher(x, s, t_ctx)
    start, before_student = tr.flops, tr.current
    with tr.window() as s_win:
        v_student = student(x, s, s_ctx)
        forward = tr.flops - start
        bc = s.reshape(-1, *([1] * (x.ndim - 1)))
        step_loss = (bc * (v_student - v_teacher)).pow(2).mean()
        (step_loss / steps).backward()
    (bc * (v_student - v_teacher)).detach().abs().mean()  # the step's gap statistic
    x + (next_sigma - sigma) * v_student.detach()  # the roll-out's Euler step
    return {
        "teacher_peak": t_win["peak"],
        "teacher_flops": t_win["flops"],
        "student_peak": s_win["peak"],
        "student_fwd_flops": forward,
        "before_teacher": before_teacher,
        "before_student": before_student,
    }


def _device(setting: Setting) -> str:
    """meta (C++ shape functions: fast) where nothing depends on the device; fake CPU tensors where the CPU's own
    dispatch is measured (target cpu) or autocast must act (mixed precision: autocast has no meta backend)."""
    return "meta" if setting.target == "gpu" and setting.mixed_precision == "no" else "cpu"


def measure_point(
    spec: Any, setting: Setting, overrides: dict[str, int], eight_bit: bool = False, phases: tuple[str, ...] = PHASES
) -> dict[str, Phase]:
    """The phases of one step on the denoiser built with `overrides` (depth). With the same batch for prior
    preservation as for the main term, the prior phase is not run: its peak is bounded by the roll-out's (the
    teacher then reads the shorter caption-only context) and its FLOPs are a student forward+backward and a
    student-context forward."""
    device = _device(setting)
    network = build_denoiser(spec, setting, overrides)
    mode = new_mode() if device == "cpu" else None
    if mode is not None:
        to_fake(network, mode)
    params = trainable_parameters(network)
    plist = list(params.values())
    gpu = setting.target == "gpu"
    h, w, b = setting.height, setting.width, setting.batch
    shape = spec.latent_shape(h, w)
    student_call, teacher_call = spec.student(h, w), spec.teacher(h, w)
    velocity = lambda net: lambda x, s, c: spec.velocity(net, x, s, c)  # noqa: E731
    out: dict[str, Phase] = {}
    scope = mode if mode is not None else torch.device("meta")
    with scope, fused_attention(gpu):
        shadow = ParamShadow(params, "base" if setting.teacher == "live" else setting.teacher, 0.9999)
        resident = list(network.parameters()) + list(network.buffers()) + list(shadow.shadow.values())

        def grads(on: bool) -> list[torch.Tensor]:
            for p in plist:
                p.grad = torch.zeros_like(p) if on else None
            return [p.grad for p in plist if p.grad is not None]

        def rollout(batch: int, t_ctx_of: Any) -> Phase:
            tr = Window(resident + grads(True))
            with tr, _autocast(setting):
                noise, state = torch.randn(batch, *shape), torch.randn(batch, *shape)
                s_ctx, t_ctx = student_call.context(batch), t_ctx_of(batch)
                parts = rollout_state(velocity(network), shadow.wrap(velocity(network)), state, s_ctx, t_ctx, tr)
                del noise
            return Phase(tr.peak, float(tr.flops), **parts)

        if "rollout" in phases:
            out["rollout"] = rollout(b, teacher_call.context)
        if "prior" in phases:
            if setting.prior_batch == b and "rollout" in out:
                r = out["rollout"]
                s_fb = r.flops - r.teacher_flops
                out["prior"] = replace(r, flops=s_fb + r.student_fwd_flops, teacher_flops=r.student_fwd_flops)
            else:
                out["prior"] = rollout(setting.prior_batch, student_call.context)
        if "sft" in phases:
            tr = Window(resident + grads(False))
            with tr, _autocast(setting):
                x0, noise = torch.randn(b, *shape), torch.randn(b, *shape)
                sigma = torch.full((b,), 0.5)
                sft_loss(velocity(network), x0, student_call.context(b), sigma, noise).backward()
            out["sft"] = Phase(tr.peak, float(tr.flops), student_peak=tr.peak)
    if "optim" in phases:
        out["optim"] = _optim_phase(network, setting, eight_bit, mode)
    return out


def _optim_phase(network: nn.Module, setting: Setting, eight_bit: bool, mode: Any) -> Phase:
    """Clipping, the optimizer step and the EMA update, on fake CPU tensors (foreach kernels refuse meta ones)."""
    mode = mode or new_mode()
    to_fake(network, mode)
    gpu = setting.target == "gpu"
    with mode:
        params = trainable_parameters(network)
        plist = list(params.values())
        shadow = ParamShadow(params, "base" if setting.teacher == "live" else setting.teacher, 0.9999)
        for p in plist:
            p.grad = torch.zeros_like(p)
        opt = _optimizer(plist, setting, eight_bit)
        state: list[torch.Tensor] = []
        if opt is not None:
            opt.step()  # lazy state initialisation happens on the first step: warm up outside the count
            state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        resident = list(network.parameters()) + list(network.buffers()) + list(shadow.shadow.values())
        tr = Window(resident + [p.grad for p in plist] + state)
        with tr:
            torch.nn.utils.clip_grad_norm_(plist, 1.0, foreach=True if gpu else None)
            if opt is not None:
                opt.step()
            shadow.update()
    return Phase(tr.peak, 0.0)


BASE_DEPTH = 2  # blocks of each kind at the base point (2 rather than 1: see `extrapolate`)


def depth_points(spec: Any) -> list[dict[str, int]]:
    """The depth overrides to measure: every knob at the base depth, then each knob one higher."""
    base = {k: min(BASE_DEPTH, n) for k, n in spec.depth.items()}
    return [base] + [{**base, k: base[k] + 1} for k in spec.depth]


PHASE_FIELDS = (
    "peak",
    "flops",
    "teacher_peak",
    "student_peak",
    "teacher_flops",
    "student_fwd_flops",
    "before_teacher",
    "before_student",
)


def extrapolate(spec: Any, points: list[dict[str, Phase]]) -> dict[str, Phase]:
    """Linear in each depth knob: q(full) = q(b) + Σ_k (n_k − b)·(q(k at b+1) − q(b)).

    Exact for what identical blocks add (saved activations, FLOPs). A peak is a maximum over moments, and
    which moment wins can change with depth (a roll-out state's teacher forward at low depth, its student
    backward at full depth): a roll-out phase's peak is therefore rebuilt from its two parts, each
    extrapolated on its own, and the base point has 2 blocks of each kind so that every kind's own
    transient is already in place."""
    base, out = points[0], {}
    for name, p0 in base.items():
        fields = {}
        for f in PHASE_FIELDS:
            v = getattr(p0, f)
            for (_knob, full), pk in zip(spec.depth.items(), points[1:]):
                b = min(BASE_DEPTH, full)
                v += (full - b) * (getattr(pk[name], f) - getattr(p0, f))
            fields[f] = v
        phase = Phase(**fields)
        if name in ("rollout", "prior"):
            phase.peak = max(phase.before_teacher + phase.teacher_peak, phase.before_student + phase.student_peak)
        out[name] = phase
    return out


def full_depth_params(spec: Any) -> int:
    net = build_meta(lambda: spec.parts[spec.denoiser]({}), spec.dtype)
    return sum(p.numel() for p in net.parameters())


def measure(
    spec: Any, setting: Setting, eight_bit: bool = False, exact: bool | None = None, phases: tuple[str, ...] = PHASES
) -> dict[str, Phase]:
    """Every phase at the full depth: measured whole (small networks, or exact=True) or extrapolated."""
    if exact is None:
        exact = not spec.depth or full_depth_params(spec) < FULL_DEPTH_BELOW
    if exact:
        return measure_point(spec, setting, {}, eight_bit, phases)
    return extrapolate(spec, [measure_point(spec, setting, o, eight_bit, phases) for o in depth_points(spec)])


def grad_input_linears(spec: Any, setting: Setting) -> set[str]:
    """Names of the frozen nn.Linear layers whose input needs a gradient in a student forward (those whose
    dequantized weight a quantized base saves for the backward), from one forward on fake tensors with the
    repeated blocks at the base depth (names outside the blocks are the full network's)."""
    network = build_denoiser(spec, setting, depth_points(spec)[0] if spec.depth else {})
    mode = new_mode() if setting.target == "cpu" else None  # meta: no autocast is needed here
    if mode is not None:
        to_fake(network, mode)
    found: set[str] = set()
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, n=name: found.add(n) if args[0].requires_grad else None)
        for name, m in network.named_modules()
        if isinstance(m, nn.Linear) and not m.weight.requires_grad
    ]
    h, w, b = setting.height, setting.width, 1
    with mode if mode is not None else torch.device("meta"), fused_attention(setting.target == "gpu"):
        spec.velocity(
            network, torch.randn(b, *spec.latent_shape(h, w)), torch.full((b,), 0.5), spec.student(h, w).context(b)
        )
    for hook in hooks:
        hook.remove()
    return found
