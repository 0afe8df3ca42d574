"""Teacher weights for self-distillation: the same network, other values of its trainable parameters.

The teacher differs from the student only in the values of the *trainable* parameters (the LoRA
matrices under LoRA, every weight under full fine-tuning), so one copy of the frozen base weights serves
both. A `ParamShadow` keeps the teacher's values beside the live ones and swaps them in for a
teacher forward:
  * ema  – slow exponential moving average of the student (default, decay 0.9999), updated after
           every optimizer step;
  * base – the initial values, frozen (under LoRA: the adapter at init, B=0, i.e. the adapter off);
  * live – no copy: the teacher is the current student (ablation; it collapses).
The same class gives the *original* model for on-policy prior preservation (mode "base").

An EMA shadow is float32 whatever the weights' dtype: a decay of 0.9999 moves it by 1e-4 of the gap to the
student per step, which a bf16 shadow (8 mantissa bits) rounds away entirely. Sharded weights (DTensors of torch
FSDP2, dopsd.training.sharding) get a shadow sharded the same way: a clone of each DTensor.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal

import torch
from torch import nn

try:  # sharded weights (torch FSDP2); a torch built without torch.distributed has none
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - such builds are rare

    class DTensor:  # type: ignore[no-redef]
        pass


from dopsd.core.objective import VelocityFn

TeacherMode = Literal["ema", "base", "live"]


class ParamShadow:
    def __init__(self, named_params: dict[str, nn.Parameter], mode: TeacherMode = "ema", decay: float = 0.9999):
        if mode not in ("ema", "base", "live"):
            raise ValueError(f"teacher mode must be 'ema', 'base' or 'live', got {mode!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.mode: TeacherMode = mode
        self.decay = decay
        self.params = dict(named_params)
        self.shadow: dict[str, torch.Tensor] = (
            {}
            if mode == "live"
            else {k: p.detach().to(shadow_dtype(p, mode), copy=True) for k, p in self.params.items()}
        )

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: θ̄ ← d·θ̄ + (1−d)·θ for ema; nothing for base and live."""
        if self.mode != "ema":
            return
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily give the network the teacher's parameter values (no copies: storage swap)."""
        if self.mode == "live":
            yield
            return
        # A caller's autocast region may hold low-precision casts of the other values (its cache is keyed by the
        # parameter, which the swap keeps): drop them on both sides of the swap.
        torch.clear_autocast_cache()
        live = {name: _swap_in(p, self.shadow[name]) for name, p in self.params.items()}
        try:
            yield
        finally:
            for name, p in self.params.items():
                _restore(p, live[name])
            torch.clear_autocast_cache()

    def wrap(self, velocity: VelocityFn) -> VelocityFn:
        """A velocity function that runs `velocity` with the shadow weights and no gradient."""

        def teacher_velocity(x: torch.Tensor, sigma: torch.Tensor, context: Any) -> torch.Tensor:
            with torch.no_grad(), self.swapped_in():
                return velocity(x, sigma, context)

        return teacher_velocity

    def state_dict(self) -> dict[str, Any]:
        """The shadow's state (its tensors themselves, not copies: a checkpoint writer copies them to the CPU)."""
        return {"mode": self.mode, "decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint teacher mode {state['mode']!r} differs from the configured {self.mode!r}")
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"teacher state does not match the model's trainable parameters: {sorted(missing)[:5]}")
        for k, v in state["shadow"].items():
            copy_full_(self.shadow[k], v)


def shadow_dtype(p: torch.Tensor, mode: str) -> torch.dtype:
    """An EMA keeps at least float32; a frozen copy (base) keeps the weights' own dtype, which holds them exactly."""
    if mode == "ema" and p.is_floating_point():
        return torch.promote_types(p.dtype, torch.float32)
    return p.dtype


def _swap_in(p: nn.Parameter, shadow: torch.Tensor) -> torch.Tensor:
    """Give `p` the shadow's values; returns what restores the live ones (`_restore`).

    A plain parameter swaps storage with the shadow (no copy). A sharded one (DTensor) is overwritten in place:
    FSDP all-gathers from the parameter's own sharded storage, which a `p.data` swap would not reach, so its live
    values wait in a copy of this process's shard. A shadow of another dtype than the weights (a float32 EMA of
    bf16 weights outside the trainer) is swapped in as a cast copy, so the network keeps one dtype."""
    if isinstance(p, DTensor):
        with torch.no_grad():
            live = p.detach().clone()
            p.copy_(shadow)
        return live
    live = p.data
    p.data = shadow if shadow.dtype == p.dtype else shadow.to(p.dtype)
    return live


def _restore(p: nn.Parameter, live: torch.Tensor) -> None:
    if isinstance(p, DTensor):
        with torch.no_grad():
            p.copy_(live)
    else:
        p.data = live


def copy_full_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """dst ← full, where `full` is the whole tensor (as checkpoints store it) and `dst` may be this process's
    shard of it (a DTensor): each process takes its own part of `full`, with no communication."""
    with torch.no_grad():
        if isinstance(dst, DTensor):
            full = full.to(dst.device, dst.dtype)
            dst.copy_(distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None))
        else:
            dst.copy_(full)


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}
