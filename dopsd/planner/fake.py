"""Running full-size networks without memory: meta-device builds, fake tensors, live-bytes and FLOP counting.

* Networks are built on the meta device (peft, `.to(dtype)` and the trainer's own set-up code work there
  unchanged), then every parameter and buffer is turned into a fake CPU tensor, so that forwards and
  backwards run through the real model code and CPU dispatch (kernel choice included) at no memory cost.
* `LiveBytes` follows the storages that ops create during a region and their lifetimes (a weak reference
  per storage): its peak is the most bytes alive at once, beyond the tensors that already existed.
* `fused_attention()` replaces `F.scaled_dot_product_attention` by the fused CPU flash kernel, which keeps
  what GPU fused kernels keep (q, k, v, output and a per-row logsumexp) and never the L×L matrix; without
  it the CPU dispatch is measured as it is (the math path materialises L×L).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dopsd.planner.counting import cpu_sdpa_mapping


def new_mode() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """diffusers/transformers warn about casting on meta builds (irrelevant here); keep the planner's output clean."""
    names = ("diffusers", "transformers")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def build_meta(builder: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """Build on the meta device and cast like `from_pretrained(torch_dtype=...)` (keeping fp32 modules fp32)."""
    with quiet(), torch.device("meta"):
        module = builder()
    with quiet():
        module.to(dtype)
        keep = getattr(module, "_keep_in_fp32_modules", None) or []
        for name, sub in module.named_modules():
            if any(k in name.split(".") for k in keep):
                sub.float()
    return module


def to_fake(module: nn.Module, mode: FakeTensorMode, device: str = "cpu") -> nn.Module:
    """Turn every parameter and buffer of a meta-device module into a fake tensor on `device` (in place)."""
    dev = torch.device(device)
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(original) -> (original, fake): tied weights stay tied

    def fake(t: torch.Tensor) -> torch.Tensor:
        base = t.detach() if t.is_meta else t.detach().to("meta")
        return FakeTensor(mode, base, dev)

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None or isinstance(p.data, FakeTensor):
                continue
            if id(p) not in memo:
                memo[id(p)] = (p, nn.Parameter(fake(p.data), requires_grad=p.requires_grad))
            sub._parameters[name] = memo[id(p)][1]
        for name, b in list(sub._buffers.items()):
            if b is None or isinstance(b, FakeTensor):
                continue
            if id(b) not in memo:
                memo[id(b)] = (b, fake(b))
            sub._buffers[name] = memo[id(b)][1]
    return module


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[id(st)] = st.nbytes()
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """Bytes of storages created inside the region that are still alive, and their peak; and FLOPs.

    Storages of `resident` tensors (weights, optimizer state, …) are known and never counted, so a view of a
    weight (e.g. the transpose inside a Linear) costs nothing, as on a real device. FLOPs use the formulas of
    torch's FlopCounterMode (its registry), counted here because FlopCounterMode itself keeps activations
    alive that non-reentrant gradient checkpointing would free.
    """

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.formulas = flop_formulas()
        self.flops = 0
        self.known = {id(t.untyped_storage()): t.untyped_storage() for t in resident if isinstance(t, torch.Tensor)}
        self.refs: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> Callable[[Any], None]:
        def callback(ref: weakref.ref) -> None:
            entry = self.refs.get(key)
            if entry is not None and entry[0] is ref:
                del self.refs[key]
                self.current -= entry[1]

        return callback

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self.known:
            return
        entry = self.refs.get(key)
        if entry is not None and entry[0]() is st:
            return
        n = st.nbytes()
        self.refs[key] = (weakref.ref(st, self._release(key)), n)
        self.current += n
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch protocol
        out = func(*args, **(kwargs or {}))
        formula = self.formulas.get(func.overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **(kwargs or {}), out_val=out))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):  # noqa: ANN001
    """The fused kernel's memory behaviour: output + per-row logsumexp, no L×L scores (any mask is broadcast)."""
    if key.shape[-3] != query.shape[-3]:  # grouped-query attention: fused GPU kernels read the shared heads
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        attn_mask = attn_mask.to(query.dtype)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )[0]


@contextlib.contextmanager
def fused_attention(enabled: bool = True) -> Iterator[None]:
    """Route every SDPA call through the fused kernel (the GPU case); no-op when disabled (the CPU case)."""
    if not enabled:
        yield
        return
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """torch's FLOP formulas by op, plus the standard attention formula for the CPU flash kernels."""
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    formulas = dict(flop_registry)
    for op, fn in cpu_sdpa_mapping().items():
        formulas[op] = shape_wrapper(fn)
    return formulas
